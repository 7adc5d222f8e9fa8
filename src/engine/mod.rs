//! Turning requests into batches: sequences, sampling, stop conditions and model steps.

pub mod admission;
pub mod batch;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;

pub use admission::{Admission, Overload, OverloadReason, WaitSlot};
pub use batch::{generate_all, step};
pub use sampler::{Sampler, SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};
pub use scheduler::{
    AdapterLoad, Completed, Engine, EngineConfig, Event, GenerateRequest, RequestHandle,
    SubmitError,
};
pub use sequence::{FinishReason, Sequence, TokenEvent};
