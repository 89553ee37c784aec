//! Stop strings for one choice: matched on the generated text across token boundaries, never
//! emitted, safe to stream.
//!
//! Owns: the small tail of text that could still be the start of a stop string, held back until
//! it either completes a stop string or provably cannot. Must not: know about tokens, the
//! tokenizer or the engine (the caller cancels the sequence when `stopped` is reported).
//!
//! Semantics: the output is the generated text cut at the earliest position where any stop
//! string occurs, whatever the split into deltas. When one stop string completes while another
//! that started earlier is still only partly seen, the matcher keeps holding until the earlier
//! one is decided, so overlapping stop strings resolve the same way streamed or not.

/// What a pushed delta releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text safe to show now.
    pub emit: String,
    /// A stop string matched: `emit` ends right before it and everything after is dropped.
    pub stopped: bool,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes: only a tail shorter than this can be a partial match.
    max_len: usize,
    /// Received but not yet emitted text.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty strings are ignored (validation rejects them; matching one would stop at once).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, max_len, held: String::new(), stopped: false }
    }

    /// True once a stop string has matched; later pushes emit nothing.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text; returns what can be shown now.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome { emit: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopOutcome { emit: delta.to_string(), stopped: false };
        }
        self.held.push_str(delta);
        let hold_from = self.partial_start();
        match self.earliest_match() {
            // A stop string starting at or before every still-possible one decides it.
            Some(at) if at <= hold_from => self.stop_at(at),
            // Nothing before `hold_from` can belong to a stop string any more.
            _ => {
                let rest = self.held.split_off(hold_from);
                StopOutcome { emit: std::mem::replace(&mut self.held, rest), stopped: false }
            }
        }
    }

    /// The sequence ended for another reason: releases the held text (cut at a stop string
    /// that had already completed but was waiting on an earlier partial one).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        match self.earliest_match() {
            Some(at) => self.stop_at(at).emit,
            None => std::mem::take(&mut self.held),
        }
    }

    fn stop_at(&mut self, at: usize) -> StopOutcome {
        self.stopped = true;
        self.held.truncate(at);
        StopOutcome { emit: std::mem::take(&mut self.held), stopped: true }
    }

    /// Byte offset of the earliest complete stop string in the held text.
    fn earliest_match(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min()
    }

    /// Byte offset of the earliest char boundary whose tail is a proper prefix of some stop
    /// string (it could still complete), or `held.len()` if none. Stop strings start on a char
    /// boundary, so only char boundaries are tried and multi-byte characters are never split.
    fn partial_start(&self) -> usize {
        let len = self.held.len();
        let mut from = len.saturating_sub(self.max_len.saturating_sub(1));
        while !self.held.is_char_boundary(from) {
            from += 1;
        }
        (from..len)
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Pushes every delta, then finishes; returns the emitted chunks and whether it stopped.
    /// Checks after each push that nothing beyond a possible stop-string start is held.
    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool) {
        let mut m = matcher(stops);
        let mut out = Vec::new();
        for d in deltas {
            let o = m.push(d);
            out.push(o.emit);
            if o.stopped {
                return (out, true);
            }
            // Minimal holding: only a proper prefix of some stop string is ever kept back.
            assert!(
                m.held.is_empty() || m.stops.iter().any(|s| s.len() > m.held.len() && s.starts_with(&m.held)),
                "{:?}",
                m.held
            );
        }
        out.push(m.finish());
        (out, m.stopped())
    }

    /// What the whole text should produce: cut at the earliest occurrence of any stop string.
    fn reference(stops: &[&str], text: &str) -> (String, bool) {
        match stops.iter().filter_map(|s| text.find(s)).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn empty_stop_list_passes_through_without_holding() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("ab"), StopOutcome { emit: "ab".into(), stopped: false });
        assert_eq!(m.push("é"), StopOutcome { emit: "é".into(), stopped: false });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn holds_only_a_possible_prefix_and_releases_it_when_it_breaks() {
        let mut m = matcher(&["</end>"]);
        assert_eq!(m.push("hello <").emit, "hello ");
        assert_eq!(m.push("/e").emit, "");
        // "</ex" can no longer become "</end>": all of it is released
        assert_eq!(m.push("x").emit, "</ex");
        assert_eq!(m.push("tra").emit, "tra");
    }

    #[test]
    fn stop_spanning_many_deltas_is_cut_and_the_rest_dropped() {
        let (out, stopped) = run(&["STOP"], &["abc S", "T", "O", "P and more", "ignored"]);
        assert!(stopped);
        assert_eq!(out.concat(), "abc ");
        assert_eq!(out, vec!["abc ", "", "", ""]);
        let mut m = matcher(&["STOP"]);
        m.push("xSTOPy");
        // after a stop nothing more comes out
        assert_eq!(m.push("more"), StopOutcome { emit: String::new(), stopped: true });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_at_the_very_start() {
        assert_eq!(run(&["Hi"], &["Hi there"]), (vec![String::new()], true));
        assert_eq!(run(&["Hi"], &["H", "i!"]), (vec![String::new(), String::new()], true));
    }

    #[test]
    fn finish_releases_a_partial_match() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("bye\n\nUs").emit, "bye");
        assert_eq!(m.finish(), "\n\nUs");
        assert!(!m.stopped());
    }

    #[test]
    fn multibyte_text_and_stop_strings_never_split_a_char() {
        let (out, stopped) = run(&["日本"], &["こんにちは日", "本語"]);
        assert_eq!((out.concat(), stopped), ("こんにちは".to_string(), true));
        // a stop string sharing its first bytes with an emitted character must not hold or cut it
        let (out, stopped) = run(&["é!"], &["café", "s é", "!x"]);
        assert_eq!(out, vec!["caf", "és ", ""]);
        assert!(stopped);
        let (out, _) = run(&["🙂🙃"], &["a🙂", "🙂b"]);
        assert_eq!(out.concat(), "a🙂🙂b");
    }

    #[test]
    fn overlapping_stops_earliest_position_wins() {
        assert_eq!(run(&["bcd", "abc"], &["xabcd"]).0.concat(), "x");
        // "bc" completes first, but "abcd" started earlier: wait for it, streamed or not
        for deltas in [vec!["xabcd"], vec!["xa", "bc", "d"], vec!["x", "a", "b", "c", "d"]] {
            let (out, stopped) = run(&["abcd", "bc"], &deltas);
            assert!(stopped);
            assert_eq!((out[0].as_str(), out.concat()), ("x", "x".to_string()), "{deltas:?}");
        }
        // ... and when the earlier one fails, the later complete one still cuts
        assert_eq!(run(&["abcd", "bc"], &["xa", "bc", "e"]).0.concat(), "xa");
        // the sequence ends while the earlier one is undecided: finish applies the complete one
        assert_eq!(run(&["abcd", "bc"], &["xa", "bc"]), (vec!["x".to_string(), String::new(), "a".to_string()], true));
    }

    /// Small deterministic generator so the property test needs no extra crate.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    #[test]
    fn property_output_is_independent_of_the_split() {
        let alphabet = ['a', 'b', ' ', 'é', '€', '🙂'];
        let stop_pool = ["ab", "b a", "é€", "🙂🙂", "aaa", "ba", "€🙂é", "a b🙂"];
        let mut rng = Lcg(12345);
        for case in 0..3000 {
            let text: String = (0..rng.below(24)).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            let stops: Vec<&str> = (0..rng.below(4)).map(|_| stop_pool[rng.below(stop_pool.len())]).collect();
            // random cut points on char boundaries, possibly empty deltas
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
            let mut cuts: Vec<usize> = (0..rng.below(8)).map(|_| bounds[rng.below(bounds.len())]).collect();
            cuts.extend([0, text.len()]);
            cuts.sort_unstable();
            let deltas: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let (out, stopped) = run(&stops, &deltas);
            assert_eq!((out.concat(), stopped), reference(&stops, &text), "case {case}: {text:?} {stops:?} {deltas:?}");
        }
    }
}
