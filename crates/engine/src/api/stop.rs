//! Stop strings, matched on the decoded text as it streams. Text that could be the
//! start of a stop string is held back until the next chunk decides it, so a stop
//! string split across tokens is never sent; the stop string itself is not sent.

/// What a chunk of text released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be sent (possibly empty while a partial match is held back).
    Emit(String),
    /// A stop string matched: the text before it, the last of the output.
    Stopped(String),
}

/// Matches stop strings against a stream of text chunks.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// The client's `stop_token_ids` (not the model's end-of-generation ids): a match
    /// is reported as `stop_reason`, as vLLM does.
    stop_token_ids: Vec<u32>,
    /// Text received but not yet released: a possible start of a stop string.
    held: String,
    /// The stop string that matched.
    matched: Option<String>,
    /// vLLM's `include_stop_str_in_output`: the matched stop string ends the text.
    include_stop: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stop_token_ids: Vec::new(),
            held: String::new(),
            matched: None,
            include_stop: false,
        }
    }

    /// Keeps the matched stop string at the end of the output.
    pub fn including_stop_string(mut self, include: bool) -> Self {
        self.include_stop = include;
        self
    }

    /// Takes the next chunk of output text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() {
            return StopOutcome::Stopped(String::new());
        }
        self.held.push_str(text);
        if let Some((at, stop)) = self.first_match() {
            let stop = stop.to_owned();
            let end = if self.include_stop {
                at + stop.len()
            } else {
                at
            };
            self.matched = Some(stop);
            let before = self.held[..end].to_owned();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep_from = self.partial_match_start();
        let released = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopOutcome::Emit(released)
    }

    /// Takes text that must not end the output (before `min_tokens`): releases it,
    /// with what was held back, unmatched.
    pub fn pass(&mut self, text: &str) -> String {
        let mut released = std::mem::take(&mut self.held);
        released.push_str(text);
        released
    }

    /// The output has ended: releases what was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether text is held back (a possible start of a stop string).
    pub fn holds_text(&self) -> bool {
        !self.held.is_empty()
    }

    /// The stop string that ended the output, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Also reports these client stop tokens as `stop_reason`.
    pub fn with_stop_tokens(mut self, ids: Vec<u32>) -> Self {
        self.stop_token_ids = ids;
        self
    }

    /// vLLM's `stop_reason`: the stop string that matched, or the client's stop token
    /// that ended the output (`null` for the model's own end-of-generation token).
    pub fn stop_reason(&self, stop_token: Option<u32>) -> Option<serde_json::Value> {
        if let Some(text) = &self.matched {
            return Some(serde_json::Value::String(text.clone()));
        }
        stop_token
            .filter(|t| self.stop_token_ids.contains(t))
            .map(serde_json::Value::from)
    }

    /// The earliest complete stop string in the held text and its byte offset.
    fn first_match(&self) -> Option<(usize, &str)> {
        self.stops
            .iter()
            .filter_map(|stop| Some((self.held.find(stop.as_str())?, stop.as_str())))
            .min_by_key(|&(at, _)| at)
    }

    /// Start of the longest suffix of the held text that begins some stop string
    /// (the held text's length when none does).
    fn partial_match_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let suffix = &self.held[at..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_string_can_end_the_output() {
        let mut matcher = StopMatcher::new(vec!["END".into()]).including_stop_string(true);
        assert_eq!(matcher.push("abc E"), StopOutcome::Emit("abc ".into()));
        assert_eq!(matcher.push("NDx"), StopOutcome::Stopped("END".into()));
    }

    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for chunk in chunks {
            match matcher.push(chunk) {
                StopOutcome::Emit(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_text_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_inside_a_chunk_trims_it_and_the_rest() {
        assert_eq!(run(&["END"], &["abcENDxyz", "more"]), ("abc".into(), true));
    }

    #[test]
    fn stop_split_across_chunks_is_never_released() {
        let mut matcher = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(matcher.push("Hi\n"), StopOutcome::Emit("Hi".into()));
        assert_eq!(matcher.push("\nthere"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        assert_eq!(run(&["abc"], &["xa", "b", "d"]), ("xabd".into(), false));
        assert_eq!(run(&["abc"], &["xab"]), ("xab".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "ab"], &["zabc"]), ("z".into(), true));
        let mut matcher = StopMatcher::new(vec!["c".into(), "ab".into()]);
        matcher.push("zabc");
        assert_eq!(matcher.matched(), Some("ab"));
    }

    #[test]
    fn multibyte_text_is_cut_at_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éx"], &["日本é", "y"]), ("日本éy".into(), false));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert_eq!(run(&[""], &["a"]), ("a".into(), false));
    }
}
