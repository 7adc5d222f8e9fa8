//! `intent` (downstream): home-appliance commands to a compact JSON intent, the shape of the
//! ESFT paper's intent task.
//!
//! The answer is `{"intent": I, "slots": {...}}` with Python's separators (`", "`, `": "`)
//! and the slot keys in the fixed order `device`, `room`, `time`, `value` (a slot appears
//! only when the command names it). Devices and rooms are canonicalised (`air conditioner`
//! -> `air_conditioner`, `lights` -> `light`); values and times are copied.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

/// (spoken, canonical).
pub(crate) const ROOMS: &[(&str, &str)] = &[
    ("bedroom", "bedroom"),
    ("kitchen", "kitchen"),
    ("living room", "living_room"),
    ("bathroom", "bathroom"),
    ("office", "office"),
    ("garage", "garage"),
    ("hallway", "hallway"),
    ("guest room", "guest_room"),
];

/// (spoken, canonical).
pub(crate) const DEVICES: &[(&str, &str)] = &[
    ("light", "light"),
    ("lights", "light"),
    ("lamp", "lamp"),
    ("air conditioner", "air_conditioner"),
    ("heater", "heater"),
    ("thermostat", "thermostat"),
    ("fan", "fan"),
    ("television", "tv"),
    ("tv", "tv"),
    ("oven", "oven"),
    ("coffee maker", "coffee_maker"),
    ("washing machine", "washing_machine"),
    ("dishwasher", "dishwasher"),
    ("robot vacuum", "robot_vacuum"),
];

pub(crate) const MODES: &[&str] = &["eco", "quiet", "turbo", "night", "auto", "boost"];

/// What an intent's value is.
#[derive(Clone, Copy)]
enum Value {
    None,
    Temperature,
    Brightness,
    Mode,
    Minutes,
    Time,
}

struct Intent {
    name: &'static str,
    /// Canonical devices it applies to (empty: all).
    devices: &'static [&'static str],
    value: Value,
    /// `{d}`: the device phrase, `{v}`: the value.
    templates: &'static [&'static str],
}

#[cfg(test)]
pub(crate) const INTENT_NAMES: &[&str] = &[
    "turn_on",
    "turn_off",
    "set_temperature",
    "set_brightness",
    "set_mode",
    "set_timer",
    "schedule_on",
    "check_status",
];

const INTENTS: &[Intent] = &[
    Intent {
        name: "turn_on",
        devices: &[],
        value: Value::None,
        templates: &[
            "turn on {d}",
            "switch on {d}",
            "please turn {d} on",
            "can you power up {d}",
            "i want {d} on",
        ],
    },
    Intent {
        name: "turn_off",
        devices: &[],
        value: Value::None,
        templates: &[
            "turn off {d}",
            "switch off {d}",
            "please turn {d} off",
            "can you shut down {d}",
            "i want {d} off",
        ],
    },
    Intent {
        name: "set_temperature",
        devices: &["air_conditioner", "heater", "thermostat"],
        value: Value::Temperature,
        templates: &[
            "set {d} to {v} degrees",
            "make {d} {v} degrees",
            "change the temperature of {d} to {v}",
            "i would like {d} at {v} degrees",
        ],
    },
    Intent {
        name: "set_brightness",
        devices: &["light", "lamp"],
        value: Value::Brightness,
        templates: &[
            "dim {d} to {v} percent",
            "set the brightness of {d} to {v} percent",
            "make {d} {v} percent bright",
            "change the brightness of {d} to {v}",
        ],
    },
    Intent {
        name: "set_mode",
        devices: &["fan", "air_conditioner", "robot_vacuum", "washing_machine"],
        value: Value::Mode,
        templates: &[
            "put {d} in {v} mode",
            "switch {d} to {v} mode",
            "set the mode of {d} to {v}",
            "use {v} mode on {d}",
        ],
    },
    Intent {
        name: "set_timer",
        devices: &["oven", "washing_machine", "dishwasher", "coffee_maker"],
        value: Value::Minutes,
        templates: &[
            "set a timer of {v} minutes on {d}",
            "run {d} for {v} minutes",
            "stop {d} after {v} minutes",
            "give {d} a {v} minute timer",
        ],
    },
    Intent {
        name: "schedule_on",
        devices: &[],
        value: Value::Time,
        templates: &[
            "turn on {d} at {v}",
            "switch on {d} at {v}",
            "schedule {d} to start at {v}",
            "at {v} turn on {d}",
        ],
    },
    Intent {
        name: "check_status",
        devices: &[],
        value: Value::None,
        templates: &[
            "is {d} on",
            "is {d} still running",
            "check {d} for me",
            "what is the status of {d}",
        ],
    },
];

const PREFIXES: &[&str] = &["", "", "", "please ", "hey home, ", "ok house, "];
const SUFFIXES: &[&str] = &["", "", "", " please", " thanks", " right away"];

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let intent = pick(rng, INTENTS);
    let (spoken, device) = loop {
        let d = *pick(rng, DEVICES);
        if intent.devices.is_empty() || intent.devices.contains(&d.1) {
            break d;
        }
    };
    let room = rng.random_bool(0.75).then(|| *pick(rng, ROOMS));
    let phrase = match room {
        Some((r, _)) if rng.random_bool(0.5) => format!("the {r} {spoken}"),
        Some((r, _)) => format!("the {spoken} in the {r}"),
        None => format!("the {spoken}"),
    };
    let value = match intent.value {
        Value::None => None,
        Value::Temperature => Some(rng.random_range(16..=30).to_string()),
        Value::Brightness => Some((10 * rng.random_range(1..=10)).to_string()),
        Value::Mode => Some(pick(rng, MODES).to_string()),
        Value::Minutes => Some((5 * rng.random_range(1..=12)).to_string()),
        Value::Time => Some(format!(
            "{} {}",
            rng.random_range(1..=12),
            if rng.random_bool(0.5) { "am" } else { "pm" }
        )),
    };
    let template = *pick(rng, intent.templates);
    let mut text = template.replace("{d}", &phrase);
    if let Some(v) = &value {
        text = text.replace("{v}", v);
    }
    let (mut prefix, mut suffix) = (*pick(rng, PREFIXES), *pick(rng, SUFFIXES));
    // No "please ... please".
    if text.starts_with("please") {
        prefix = "";
        if suffix == " please" {
            suffix = "";
        }
    } else if prefix == "please " && suffix == " please" {
        suffix = "";
    }
    let question = format!("{prefix}{text}{suffix}");

    // Slots in the fixed key order; every value is a bare lower-case token (no quotes or
    // backslashes), so writing the JSON by hand is exact.
    let mut slots = vec![("device", device.to_string())];
    if let Some((_, r)) = room {
        slots.push(("room", r.to_string()));
    }
    match (intent.value, value) {
        (Value::Time, Some(t)) => slots.push(("time", t)),
        (_, Some(v)) => slots.push(("value", v)),
        _ => {}
    }
    let slots: Vec<String> = slots
        .iter()
        .map(|(k, v)| format!("\"{k}\": \"{v}\""))
        .collect();
    let answer = format!(
        "{{\"intent\": \"{}\", \"slots\": {{{}}}}}",
        intent.name,
        slots.join(", ")
    );
    (question, answer)
}
