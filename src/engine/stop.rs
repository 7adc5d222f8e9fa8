//! Stop strings over streamed text: text is released only when it can no longer be the
//! start of a stop string, so a client never sees a stop string or a piece of one.

#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
}

/// What [`StopStrings::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct StopScan {
    /// Text safe to release now.
    pub emit: String,
    /// A stop string matched; everything from it on was dropped.
    pub stopped: bool,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan {
            emit,
            stopped: false,
        }
    }

    /// Releases held-back text at the end of generation (it did not become a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        let mut s = StopStrings::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.push("hello E").emit, "hello ");
        assert_eq!(s.push("N").emit, "");
        let r = s.push("D and more");
        assert_eq!(
            r,
            StopScan {
                emit: "".into(),
                stopped: true
            }
        );
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("EN").emit, "");
        assert_eq!(s.push("ough").emit, "ENough");
        assert_eq!(s.push(" E").emit, " ");
        assert_eq!(s.finish(), "E");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = StopStrings::new(vec!["cd".into(), "b".into()]);
        assert_eq!(s.push("abcd").emit, "a");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut s = StopStrings::new(vec![]);
        assert_eq!(s.push("x").emit, "x");
    }
}
