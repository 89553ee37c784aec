//! Ending constrained JSON before the token budget does: when a sequence's remaining budget
//! (`max_tokens`, or the context) nears what it takes to close the value it is writing, the
//! model's pick is replaced by the allowed token that brings the JSON closest to complete (EOS
//! once the grammar accepts, else `"`, `}`, `]`, `"}}`, a minimal value such as `0` or `""`, ...)
//! unless it picked that token itself. So a response cut by `max_tokens` is still parseable JSON
//! and the last tool call is whole; once the budget overruled the model, the finish reason is
//! `length`, the honest word for it.
//!
//! How far the end is: llguidance answers "which tokens may come next", not that. Two estimates
//! answer it here: a byte scan of the output (every grammar kiln builds is JSON, or JSON in a
//! tool-call tag, so its nesting is a distance to the end) and, near the end of the budget, the
//! closing simulated on a copy of the matcher (`state.rs`), which also counts required keys not
//! yet written. Where no allowed token gets closer (a key to write, an enum value), the closing
//! takes its fallback, the same one the simulation took.

use llguidance::toktrie::{SimpleVob, TokTrie};

/// Budget kept for a tool call's closing tag and EOS, beyond the JSON itself.
const SLACK: usize = 6;

/// What the output since the grammar engaged needs to end: its JSON nesting, and how long the
/// values it already completed took (parallel tool calls: do not begin one the budget cannot
/// hold).
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    depth: JsonDepth,
    /// Tokens of the value being written, and of the longest one completed.
    value_tokens: usize,
    longest_value: usize,
    /// Tokens a closing simulated on the grammar took from the current state, if one ran.
    simulated: Option<usize>,
    /// The latest simulation's result (kept as the state moves on), and the tokens fed since.
    last_plan: Option<usize>,
    since_plan: usize,
    /// The closing has begun: it goes on until the end, its choices are the simulation's, no
    /// need to simulate again.
    closing: bool,
}

impl Progress {
    /// One token's (or one replayed trigger's) bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        // A plan holds for the state it was simulated from.
        self.simulated = None;
        self.since_plan += 1;
        let was_open = self.depth.is_open();
        self.depth.feed(bytes);
        if was_open || self.depth.is_open() {
            self.value_tokens += 1;
        }
        if was_open && !self.depth.is_open() {
            self.longest_value = self.longest_value.max(self.value_tokens);
            self.value_tokens = 0;
        }
    }

    /// Tokens of budget below which closing starts. Inside a value each piece still to write
    /// (see [`JsonDepth::cost`]) can take a token or two (`"` then `}`), or what a simulated
    /// closing took. Between values, another value twice as long as the longest so far must
    /// fit, else the output ends here: the next one may be another tool's call, with more
    /// required arguments, and once begun it must be finished.
    pub fn reserve(&self) -> usize {
        let inside = (2 * self.depth.cost()).max(self.simulated.unwrap_or(0));
        let next = if self.depth.is_open() { 0 } else { 2 * self.longest_value };
        inside.max(next) + SLACK
    }

    /// Whether to simulate the closing from here. A first plan when a closing of up to
    /// [`SIMULATION_LIMIT`] tokens could be due; then again every step once `remaining` is
    /// within [`SIMULATION_WINDOW`] of the last plan (one model token can add a nested object's
    /// required keys), and every few tokens before that; never once the closing has begun.
    pub fn wants_simulation(&self, remaining: usize) -> bool {
        const EVERY: usize = 4;
        let heuristic = 2 * self.depth.cost() + SLACK;
        match self.last_plan {
            _ if self.closing => false,
            None => remaining <= heuristic + SIMULATION_LIMIT,
            Some(plan) => {
                let due = heuristic.max(plan + SLACK);
                remaining <= due + SIMULATION_WINDOW
                    || (remaining <= due + SIMULATION_LIMIT && self.since_plan >= EVERY)
            }
        }
    }

    pub fn set_simulated(&mut self, tokens: usize) {
        self.simulated = Some(tokens);
        self.last_plan = Some(tokens);
        self.since_plan = 0;
    }

    pub fn begin_closing(&mut self) {
        self.closing = true;
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

/// Simulated closing steps at most (a longer closing starts at once).
pub(crate) const SIMULATION_LIMIT: usize = 48;

/// Within this many tokens of the planned closing, it is simulated again every step.
pub(crate) const SIMULATION_WINDOW: usize = 8;

/// The tokens that can bring JSON closer to its end, found once per vocabulary.
pub(crate) struct Closers {
    eos: Vec<u32>,
    /// Tokens made only of `"`, `]`, `}` and JSON whitespace, or spelling one minimal value.
    tokens: Vec<(u32, Box<[u8]>)>,
}

const MINIMAL_VALUES: [&[u8]; 5] = [b"0", b"\"\"", b"null", b"[]", b"{}"];

impl Closers {
    pub fn new(trie: &TokTrie) -> Self {
        let tokens = (0..trie.vocab_size() as u32)
            .filter_map(|id| {
                let b = trie.token(id);
                let structural = b.len() <= 8
                    && b.iter().all(|c| matches!(c, b'"' | b']' | b'}' | b' ' | b'\n'))
                    && b.iter().any(|c| matches!(c, b'"' | b']' | b'}'));
                (structural || MINIMAL_VALUES.contains(&b)).then(|| (id, b.into()))
            })
            .collect();
        Self { eos: trie.eos_tokens().to_vec(), tokens }
    }

    /// The allowed token that ends the output (EOS) or most shortens the JSON, if one does.
    pub fn pick(&self, progress: &Progress, mask: &SimpleVob) -> Option<u32> {
        if let Some(&e) = self.eos.iter().find(|&&e| mask.is_allowed(e)) {
            return Some(e);
        }
        let now = progress.depth.cost();
        self.best_closer(progress, mask).filter(|&(cost, _)| cost < now).map(|(_, t)| t)
    }

    /// Where [`Self::pick`] has none (a required key still to write, an enum value): the allowed
    /// closer or minimal value leaving the least to write, else the longest of the first allowed
    /// tokens that is not whitespace alone.
    pub fn fallback(&self, progress: &Progress, mask: &SimpleVob, trie: &TokTrie) -> Option<u32> {
        const SCAN: usize = 256;
        let progress_made = |t: u32| {
            let b = trie.token(t);
            (!b.iter().all(u8::is_ascii_whitespace), b.len(), std::cmp::Reverse(t))
        };
        self.best_closer(progress, mask)
            .map(|(_, t)| t)
            .or_else(|| mask.iter().take(SCAN).max_by_key(|&t| progress_made(t)))
    }

    /// The allowed closer leaving the least to write (shorter tokens first on a tie), and that
    /// cost.
    fn best_closer(&self, progress: &Progress, mask: &SimpleVob) -> Option<(usize, u32)> {
        let (cost, _, t) = self
            .tokens
            .iter()
            .filter(|(t, _)| mask.is_allowed(*t))
            .map(|(t, b)| {
                let mut d = progress.depth.clone();
                d.feed(b);
                (d.cost(), b.len(), *t)
            })
            .min()?;
        Some((cost, t))
    }
}

/// Where the JSON written so far stands, from its bytes (text around it, such as a tool-call tag,
/// leaves it at rest).
#[derive(Clone, Debug)]
pub(crate) struct JsonDepth {
    /// Open `{` / `[`, innermost last.
    stack: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// The open (or just closed) string is an object key.
    key: bool,
    /// The last byte outside strings and whitespace; `:` at the start (a value is due).
    last: u8,
}

impl Default for JsonDepth {
    fn default() -> Self {
        Self { stack: Vec::new(), in_string: false, escaped: false, key: false, last: b':' }
    }
}

impl JsonDepth {
    /// Inside a container or a string (a top-level scalar ends without a closer).
    fn is_open(&self) -> bool {
        self.in_string || !self.stack.is_empty()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => {
                        self.in_string = false;
                        self.last = b'"';
                    }
                    _ => {}
                }
                continue;
            }
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => continue,
                b'"' => {
                    self.in_string = true;
                    self.key = self.stack.last() == Some(&b'{') && matches!(self.last, b'{' | b',');
                }
                b'{' | b'[' => self.stack.push(b),
                b'}' | b']' => {
                    self.stack.pop();
                }
                _ => {}
            }
            if b != b'"' {
                self.key = false;
            }
            self.last = b;
        }
    }

    /// A lower bound on the JSON pieces still to write: the open string, a key's `:` and value,
    /// a value after `:` or `,`, and one closer per open container.
    pub fn cost(&self) -> usize {
        let pending = if self.in_string {
            1 + if self.key { 2 } else { 0 }
        } else if self.last == b'"' && self.key {
            2
        } else {
            match self.last {
                b':' => 1,
                b',' if self.stack.last() == Some(&b'{') => 3,
                b',' => 1,
                _ => 0,
            }
        };
        pending + self.stack.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(text: &str) -> usize {
        let mut d = JsonDepth::default();
        d.feed(text.as_bytes());
        d.cost()
    }

    #[test]
    fn cost_counts_what_is_left_to_write() {
        assert_eq!(cost(""), 1, "a value is due");
        assert_eq!(cost("{}"), 0);
        assert_eq!(cost("{"), 1);
        assert_eq!(cost(r#"{"a"#), 1 + 2 + 1, "key: close it, colon, value, brace");
        assert_eq!(cost(r#"{"a""#), 2 + 1);
        assert_eq!(cost(r#"{"a": "#), 1 + 1);
        assert_eq!(cost(r#"{"a": "x"#), 1 + 1);
        assert_eq!(cost(r#"{"a": "x \" } ]"#), 1 + 1, "escaped quote and brackets inside a string");
        assert_eq!(cost(r#"{"a": "x","#), 3 + 1);
        assert_eq!(cost(r#"{"a": [1,"#), 1 + 2);
        assert_eq!(cost(r#"{"a": [1"#), 2);
        assert_eq!(cost(r#"{"a": {"b": 12}}"#), 0);
        assert_eq!(cost("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"), 0, "text around the JSON");
        assert_eq!(cost("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"ab"), 3);
    }

    #[test]
    fn between_values_the_longest_one_must_fit() {
        let mut p = Progress::default();
        assert_eq!(p.reserve(), 2 + SLACK, "a value is due");
        for t in
            ["<tool_call>", "\n", "{\"", "name", "\": \"", "f", "\", \"", "arguments", "\": {}}", "\n", "</tool_call>"]
        {
            p.feed(t.as_bytes());
        }
        assert_eq!(p.reserve(), 2 * 7 + SLACK, "the call's JSON took 7 tokens: room for one twice as long");
        p.feed(b"<tool_call>\n{");
        assert_eq!(p.reserve(), 2 + SLACK, "inside the next call: its own nesting");
    }

    #[test]
    fn cost_after_a_closing_token_is_lower() {
        let mut d = JsonDepth::default();
        d.feed(br#"{"a": {"b": "text"#);
        let before = d.cost();
        d.feed(br#""}}"#);
        assert_eq!((before, d.cost()), (3, 0));
    }
}
