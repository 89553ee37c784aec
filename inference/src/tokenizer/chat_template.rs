//! Chat templates: renders a conversation into prompt text with the model's own Jinja template,
//! the way HF transformers' `apply_chat_template` does it (same globals, same whitespace settings,
//! same Python-flavoured `tojson`, `raise_exception`, `strftime_now`), on minijinja.
//!
//! Owns: the template environment and its Python-compat helpers.
//! Must not: tokenize, or build prompts by pasting strings instead of running the template.

use crate::error::EngineError;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// A compiled-on-demand chat template plus the special-token strings HF passes to it.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    /// HF's named "tool_use" template, used instead of `source` when tools are given.
    tool_use: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("len", &self.source.len())
            .field("tool_use", &self.tool_use.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(e: Error) -> EngineError {
    EngineError::Template(e.to_string())
}

impl ChatTemplate {
    /// Parses `source` now, so a template minijinja cannot compile fails here with
    /// [`EngineError::Template`] rather than on the first chat request.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let t = Self::unchecked(source.into(), bos_token, eos_token);
        t.check(&t.source)?;
        Ok(t)
    }

    /// Without the compile check: a broken template then fails each `render` with the same
    /// message. Loaders use this so one bad template does not make the model unusable for raw
    /// completions.
    pub(crate) fn unchecked(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        Self { source, tool_use: None, bos_token, eos_token, env: environment() }
    }

    /// Adds HF's named `tool_use` template (checked like [`ChatTemplate::new`]).
    pub fn with_tool_use(mut self, source: impl Into<String>) -> Result<Self, EngineError> {
        let source = source.into();
        self.check(&source)?;
        self.tool_use = Some(source);
        Ok(self)
    }

    fn check(&self, source: &str) -> Result<(), EngineError> {
        self.env.template_from_str(source).map(|_| ()).map_err(template_error)
    }

    /// Whether the template renders a `tools` list itself (else the server describes tools).
    pub fn renders_tools(&self) -> bool {
        self.tool_use.is_some() || self.source.contains("tools")
    }

    /// The template text (the default one).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI-style JSON objects, passed through as the template sees them)
    /// with optional `tools` (JSON schemas), appending the assistant header when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_with_kwargs(messages, tools, add_generation_prompt, &serde_json::Map::new())
    }

    /// As [`ChatTemplate::render`], with extra template variables (vLLM's `chat_template_kwargs`,
    /// e.g. `enable_thinking`). They may override `bos_token`/`eos_token` but not the conversation.
    pub fn render_with_kwargs(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        let source = match (tools, &self.tool_use) {
            (Some(_), Some(t)) => t.as_str(),
            _ => self.source.as_str(),
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        // HF passes the tokenizer's special-token strings, then the caller's kwargs over them.
        for (name, tok) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(t) = tok {
                ctx.insert(name.to_string(), Value::from(t.as_str()));
            }
        }
        for (k, v) in kwargs {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        // `none`, not undefined: HF passes `tools=None`, and templates test `tools is not none`.
        ctx.insert("tools".into(), tools.map_or(Value::from(()), Value::from_serialize));
        ctx.entry("documents".into()).or_insert(Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        self.env.render_named_str("chat_template", source, ctx).map_err(template_error)
    }
}

/// The environment HF builds: `trim_blocks` + `lstrip_blocks` (templates are written for them),
/// loop controls, Python string/dict methods, and its three extra globals/filters.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    // Replaces minijinja's own `tojson`, which is compact and HTML-escapes `<>&'`: the prompt
    // must contain what Python's `json.dumps` writes, or tool schemas differ from training.
    env.add_filter("tojson", tojson);
    env
}

/// Templates call this to reject a conversation (e.g. roles not alternating).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)`: the current date, used by Llama 3.x templates. UTC (the server's clock).
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`. Keys come out in the order the value holds them.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(usize::try_from(v)?)),
        Some(v) => Some(v.as_str().map(str::to_string).ok_or_else(|| bad_arg("indent must be an int or a string"))?),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(bad_arg("separators must be a pair")),
        // Python's defaults: no space after ',' once lines are broken.
        None => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(out)
}

fn bad_arg(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {msg}"))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn newline(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOpts, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, v),
        ValueKind::String => write_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, opts, level, ('[', ']'), &items, |out, item, lvl| write_json(out, item, opts, lvl))?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_container(out, opts, level, ('{', '}'), &keys, |out, key, lvl| {
                // JSON keys are strings; Python's json.dumps stringifies numeric keys the same way.
                write_string(out, &key.to_string(), opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, &v.get_item(key)?, opts, lvl)
            })?;
        }
        kind => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialize a {kind}"))),
    }
    Ok(())
}

/// `[a, b]` / `{k: v}` with Python's line breaking; empty containers stay `[]` / `{}`.
fn write_container<F>(
    out: &mut String,
    opts: &JsonOpts,
    level: usize,
    brackets: (char, char),
    items: &[Value],
    mut each: F,
) -> Result<(), Error>
where
    F: FnMut(&mut String, &Value, usize) -> Result<(), Error>,
{
    out.push(brackets.0);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        newline(out, opts, level + 1);
        each(out, item, level + 1)?;
    }
    if !items.is_empty() {
        newline(out, opts, level);
    }
    out.push(brackets.1);
    Ok(())
}

fn write_number(out: &mut String, v: &Value) {
    match f64::try_from(v.clone()) {
        Ok(f) if !v.is_integer() && f.is_nan() => out.push_str("NaN"),
        Ok(f) if !v.is_integer() && f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        // minijinja prints integers plainly and floats Python-style (`1.0`, `0.5`).
        _ => out.push_str(&v.to_string()),
    }
}

/// JSON string escaping as Python does it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other
/// control characters as `\u00XX`; non-ASCII verbatim unless `ensure_ascii`.
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // shift the epoch to 0000-03-01 so leap days end each 400-year era
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Python's `strftime` for the directives chat templates use, in UTC. `%-d` style (no padding)
/// is accepted as glibc does; unknown directives are kept verbatim.
fn strftime(format: &str, unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + i64::from(m > 2 && is_leap(y));
    let month = MONTHS[(m - 1) as usize];
    let hour12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| if no_pad { v.to_string() } else { format!("{v:0width$}") };
        let s = match spec {
            Some('Y') => y.to_string(),
            Some('y') => num(y.rem_euclid(100), 2),
            Some('m') => num(m, 2),
            Some('d') => num(d, 2),
            Some('e') => format!("{d:>2}"),
            Some('j') => num(yday, 3),
            Some('H') => num(hh, 2),
            Some('I') => num(hour12, 2),
            Some('M') => num(mm, 2),
            Some('S') => num(ss, 2),
            Some('p') => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            Some('B') => month.to_string(),
            Some('b') | Some('h') => month[..3].to_string(),
            Some('A') => WEEKDAYS[weekday].to_string(),
            Some('a') => WEEKDAYS[weekday][..3].to_string(),
            Some('w') => weekday.to_string(),
            Some('F') => format!("{y}-{m:02}-{d:02}"),
            Some('D') => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            Some('T') => format!("{hh:02}:{mm:02}:{ss:02}"),
            Some('R') => format!("{hh:02}:{mm:02}"),
            Some('Z') => "UTC".to_string(),
            Some('z') => "+0000".to_string(),
            Some('%') => "%".to_string(),
            Some(other) => format!("%{}{other}", if no_pad { "-" } else { "" }),
            None => "%".to_string(),
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: serde_json::Value) -> Result<String, EngineError> {
        let msgs = messages.as_array().cloned().unwrap_or_default();
        ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()))?.render(&msgs, None, true)
    }

    #[test]
    fn bad_template_is_a_template_error() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None).err();
        assert!(matches!(err, Some(EngineError::Template(_))), "{err:?}");
        let unchecked = ChatTemplate::unchecked("{% if %}".into(), None, None);
        assert!(matches!(unchecked.render(&[], None, false), Err(EngineError::Template(_))));
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}";
        match render(src, json!([{"role": "assistant", "content": "x"}])) {
            Err(EngineError::Template(m)) => assert!(m.contains("roles must alternate"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn globals_python_methods_and_loop_controls() {
        let src = "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                   {{ m.role.upper() }}:{{ m.content.strip() }};{% endfor %}{% if tools is none %}N{% endif %}\
                   {% if add_generation_prompt %}{{ eos_token }}{% endif %}";
        let msgs = json!([{"role": "system", "content": " a "}, {"role": "user", "content": "b\n"}, {"role": "user", "content": "c"}]);
        assert_eq!(render(src, msgs).ok().as_deref(), Some("<s>SYSTEM:a;USER:b;N</s>"));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        // Keys already in sorted order: the output is then the same whether or not serde_json /
        // minijinja preserve insertion order.
        let v = json!({"d": "<a & 'b'> é", "e": {}, "name": "f", "p": [1, 2.5, true, null]});
        let one = render("{{ messages[0] | tojson }}", json!([v.clone()])).ok();
        assert_eq!(one.as_deref(), Some(r#"{"d": "<a & 'b'> é", "e": {}, "name": "f", "p": [1, 2.5, true, null]}"#));
        let ind = render("{{ messages[0].p | tojson(indent=2) }}", json!([v])).ok();
        assert_eq!(ind.as_deref(), Some("[\n  1,\n  2.5,\n  true,\n  null\n]"));
        let esc = render("{{ messages[0] | tojson(ensure_ascii=true) }}", json!(["é\n"])).ok();
        assert_eq!(esc.as_deref(), Some(r#""\u00e9\n""#));
    }

    #[test]
    fn tool_use_template_is_chosen_with_tools() -> Result<(), EngineError> {
        let t = ChatTemplate::new("plain", None, None)?.with_tool_use("tools:{{ tools | length }}")?;
        assert_eq!(t.render(&[], None, false)?, "plain");
        assert_eq!(t.render(&[], Some(&[json!({"type": "function"})]), false)?, "tools:1");
        Ok(())
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-12-25 13:05:09 UTC, a Wednesday, day 360 of a leap year.
        let t = 1_735_131_909;
        assert_eq!(strftime("%d %b %Y", t), "25 Dec 2024");
        assert_eq!(
            strftime("%A %B %-d, %j %H:%M:%S %I%p %F %%", t),
            "Wednesday December 25, 360 13:05:09 01PM 2024-12-25 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%F", 951_782_400), "2000-02-29");
    }
}
