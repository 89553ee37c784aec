//! Turns a tool-calling turn's text back into OpenAI's shape, incrementally, so streamed and
//! non-streamed responses come from the same code: text before `<tool_call>` is `content`; each
//! call yields a start (id, name) and then its `arguments` (exactly the JSON the model wrote) as
//! one piece, once the arguments are complete. Whole calls only: a call the token budget (or a
//! stop string) cut off is dropped, never padded, and since nothing of it was sent before it
//! completed, a streamed response drops it too. Text that might be the start of `<tool_call>` is
//! held back, so no tag ever leaks into `content`.
//!
//! A bare `{"name": ...}` object, or one in a ```` ```json ```` block, as the very first output is a
//! call too (see `grammar.rs`).
//! The grammar guarantees the layout; the parser tolerates whitespace variations anyway.

use super::{call_id, ToolCall, BARE_OPEN, CALL_CLOSE, CALL_OPEN, FENCE_CLOSE, FENCE_OPEN};
use crate::FinishReason;

/// The finish reason of a turn that may call tools: calls that ended normally are
/// [`FinishReason::ToolCalls`]; a cut-off turn stays `Length`.
pub fn finish_reason(has_calls: bool, r: FinishReason) -> FinishReason {
    if has_calls && r == FinishReason::Stop {
        FinishReason::ToolCalls
    } else {
        r
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Start { index: usize, id: String, name: String },
    Args { index: usize, fragment: String },
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Content,
    /// After `<tool_call>` (or at a bare call's `{`), until `"arguments":`. `close` ends the
    /// call: `</tool_call>`, a bare call's `}` or a fenced call's closing fence.
    Head { close: &'static str },
    /// Inside the arguments value.
    Args { scan: Scan, close: &'static str },
    /// After the arguments, until `close`.
    Tail { close: &'static str },
}

/// Bracket depth of a JSON value being streamed, string-aware.
#[derive(Debug, Default)]
struct Scan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    started: bool,
}

impl Scan {
    /// Consumes `c`; true when it completes the value.
    fn step(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        if c.is_whitespace() && !self.started {
            return false;
        }
        self.started = true;
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
        self.depth == 0 && !self.in_string
    }
}

#[derive(Debug, Default)]
pub struct CallParser {
    buf: String,
    state: State,
    /// Complete calls.
    calls: Vec<ToolCall>,
    /// The call being read, until its arguments are complete.
    pending: Option<ToolCall>,
    /// Whitespace after a call, sent only if real content follows it.
    pending_ws: String,
    /// Some content was sent: a bare or fenced call can no longer start.
    sent_content: bool,
}

impl CallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Complete calls seen so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.advance(&mut out) {}
        out
    }

    /// The end of the output: held-back text that never became a tag is content after all; a
    /// call still incomplete is dropped.
    pub fn finish(&mut self) -> Vec<Piece> {
        self.pending = None;
        let mut out = Vec::new();
        if matches!(self.state, State::Content) && !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.content(&rest, &mut out);
        }
        out
    }

    fn content(&mut self, text: &str, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        if !self.calls.is_empty() && text.trim().is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let mut s = std::mem::take(&mut self.pending_ws);
        s.push_str(text);
        self.sent_content = true;
        out.push(Piece::Content(s));
    }

    /// One state transition on the buffer; false when it needs more text.
    fn advance(&mut self, out: &mut Vec<Piece>) -> bool {
        match &mut self.state {
            State::Content => {
                if !self.sent_content && self.calls.is_empty() {
                    let start = self.buf.trim_start();
                    for (open, keep, close) in [(BARE_OPEN, 0, "}"), (FENCE_OPEN, FENCE_OPEN.len(), FENCE_CLOSE)] {
                        if start.starts_with(open) {
                            self.buf = start[keep..].to_string();
                            self.state = State::Head { close };
                            return true;
                        }
                    }
                    if BARE_OPEN.starts_with(start) || FENCE_OPEN.starts_with(start) {
                        return false; // may still become a bare or fenced call
                    }
                }
                if let Some(at) = self.buf.find(CALL_OPEN) {
                    let before = self.buf[..at].to_string();
                    self.buf.drain(..at + CALL_OPEN.len());
                    if self.calls.is_empty() || !before.trim().is_empty() {
                        self.content(&before, out);
                    }
                    self.pending_ws.clear();
                    self.state = State::Head { close: CALL_CLOSE };
                    return true;
                }
                let keep = partial_tag_len(&self.buf, CALL_OPEN);
                let emit: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.content(&emit, out);
                false
            }
            State::Head { close } => {
                let close = *close;
                let Some((name, args_at)) = head(&self.buf) else { return false };
                self.buf.drain(..args_at);
                self.pending = Some(ToolCall { id: call_id(), name, arguments: String::new() });
                self.state = State::Args { scan: Scan::default(), close };
                true
            }
            State::Args { scan, close } => {
                let close = *close;
                let mut end = None;
                for (i, c) in self.buf.char_indices() {
                    if scan.step(c) {
                        end = Some(i + c.len_utf8());
                        break;
                    }
                }
                let take = end.unwrap_or(self.buf.len());
                let fragment: String = self.buf.drain(..take).collect();
                let Some(call) = self.pending.as_mut() else { return false };
                call.arguments.push_str(&fragment);
                if end.is_none() {
                    return false;
                }
                let call = self.pending.take().expect("checked above");
                let index = self.calls.len();
                out.push(Piece::Start { index, id: call.id.clone(), name: call.name.clone() });
                out.push(Piece::Args { index, fragment: call.arguments.clone() });
                self.calls.push(call);
                self.state = State::Tail { close };
                true
            }
            State::Tail { close } => {
                let close = *close;
                let Some(at) = self.buf.find(close) else { return false };
                self.buf.drain(..at + close.len());
                self.state = State::Content;
                true
            }
        }
    }
}

/// `{"name": "<name>", "arguments": ` at the start of `s` (whitespace-tolerant): the name and
/// where the arguments value begins. `None` until all of it has arrived.
fn head(s: &str) -> Option<(String, usize)> {
    let key = s.find("\"arguments\"")?;
    let after_key = key + "\"arguments\"".len();
    let colon = after_key + s[after_key..].find(':')?;
    let value_at = colon + 1 + s[colon + 1..].find(|c: char| !c.is_whitespace())?;
    let prefix = s[..key].trim().trim_start_matches('{').trim().trim_end_matches(',').trim();
    let name_json = prefix.strip_prefix("\"name\"")?.trim().strip_prefix(':')?.trim();
    let name: String = serde_json::from_str(name_json).ok()?;
    Some((name, value_at))
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag` (text to hold back).
fn partial_tag_len(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}ris\\\"\", \"n\": [1, {\"x\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";

    fn run(chunks: &[&str]) -> (String, Vec<ToolCall>, Vec<Piece>) {
        let mut p = CallParser::new();
        let mut pieces = Vec::new();
        for c in chunks {
            pieces.extend(p.push(c));
        }
        pieces.extend(p.finish());
        let content =
            pieces.iter().filter_map(|x| if let Piece::Content(c) = x { Some(c.as_str()) } else { None }).collect();
        (content, p.calls().to_vec(), pieces)
    }

    #[test]
    fn whole_and_char_by_char_agree() {
        let (content, calls, _) = run(&[OUT]);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"city\": \"Pa}ris\\\"\", \"n\": [1, {\"x\": 2}]}");
        assert_eq!(calls[1].arguments, "{}");
        let chars: Vec<String> = OUT.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        let (c2, calls2, pieces) = run(&refs);
        assert_eq!(c2, content);
        assert_eq!(
            calls2.iter().map(|c| (&c.name, &c.arguments)).collect::<Vec<_>>(),
            calls.iter().map(|c| (&c.name, &c.arguments)).collect::<Vec<_>>()
        );
        assert!(pieces.iter().all(|p| !matches!(p, Piece::Content(c) if c.contains('<'))), "{pieces:?}");
    }

    #[test]
    fn text_without_calls_passes_through_including_lookalikes() {
        let (content, calls, _) = run(&["a <b> <tool", "_c"]);
        assert_eq!(content, "a <b> <tool_c");
        assert!(calls.is_empty());
        assert_eq!(partial_tag_len("xx<tool_", CALL_OPEN), 6);
        assert_eq!(partial_tag_len("é<", CALL_OPEN), 1);
        assert_eq!(partial_tag_len("abc", CALL_OPEN), 0);
    }

    #[test]
    fn bare_call_at_the_start_only() {
        let bare = "\n{\"name\": \"f\", \"arguments\": {\"a\": [1]}}";
        let chars: Vec<String> = bare.chars().map(String::from).collect();
        let (content, calls, _) = run(&chars.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, "{\"a\": [1]}");
        let (content, calls, _) = run(&["Here: {\"name\": \"f\"}"]);
        assert_eq!((content.as_str(), calls.len()), ("Here: {\"name\": \"f\"}", 0));
        let fenced = "```json\n{\"name\": \"f\", \"arguments\": {}}\n```";
        let chars: Vec<String> = fenced.chars().map(String::from).collect();
        let (content, calls, _) = run(&chars.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!((content.as_str(), calls.len(), calls[0].arguments.as_str()), ("", 1, "{}"));
        let (content, calls, _) = run(&["```python\nx = 1\n```"]);
        assert_eq!((content.as_str(), calls.len()), ("```python\nx = 1\n```", 0));
        let (content, calls, _) = run(&["{\"na", "me2\": 1}"]);
        assert_eq!((content.as_str(), calls.len()), ("{\"name2\": 1}", 0));
    }

    #[test]
    fn a_truncated_call_is_dropped_whole_and_never_streamed() {
        let first = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let cut = "\n<tool_call>\n{\"name\": \"g\", \"arguments\": {\"a\": \"b";
        let chars: Vec<String> = format!("{first}{cut}").chars().map(String::from).collect();
        let (content, calls, pieces) = run(&chars.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(content, "");
        assert_eq!(calls.len(), 1, "only the whole call");
        assert_eq!(calls[0].arguments, "{\"a\": 1}");
        assert!(!pieces.iter().any(|p| matches!(p, Piece::Start { name, .. } if name == "g")), "{pieces:?}");
        assert!(!pieces.iter().any(|p| matches!(p, Piece::Args { index: 1, .. })), "{pieces:?}");
        // Arguments complete, closing tag cut: the call is whole.
        let (_, calls, _) = run(&["<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool"]);
        assert_eq!(calls.len(), 1);
    }
}
