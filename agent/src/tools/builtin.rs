//! The builtin tools every agent may enable: `current_time` (RFC 3339, UTC / fixed offset / IANA
//! zone) and `calculator` (exact arithmetic, see `calc.rs`). They are pure and fast: no I/O
//! besides the clock and the time-zone database, and they must never panic on any argument.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;
use serde_json::{json, Value};

use super::calc;
use super::{Tool, ToolDef, ToolError};

/// All builtins, in the order the model sees them.
pub fn builtins() -> Vec<Arc<dyn Tool>> {
    vec![Arc::new(CurrentTime::new()), Arc::new(Calculator::new())]
}

/// `current_time {"timezone"?: string}` -> "2026-12-07T12:30:00+01:00".
pub struct CurrentTime {
    def: ToolDef,
}

impl CurrentTime {
    pub fn new() -> Self {
        let def = ToolDef {
            name: "current_time".into(),
            description: "The current date and time as RFC 3339, to the second. `timezone` is \"UTC\" \
                          (the default), a fixed offset like \"+02:00\" or an IANA name like \"Europe/Paris\"."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "timezone": {"type": "string", "description": "UTC, +HH:MM / -HH:MM, or an IANA zone name"}
                },
                "additionalProperties": false
            }),
        };
        CurrentTime { def }
    }
}

impl Default for CurrentTime {
    fn default() -> Self {
        Self::new()
    }
}

impl Tool for CurrentTime {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        let result = match args.get("timezone") {
            None | Some(Value::Null) => format_time(Timestamp::now(), "UTC"),
            Some(Value::String(tz)) => format_time(Timestamp::now(), tz),
            Some(other) => Err(ToolError::Failed(format!("timezone must be a string, got {other}"))),
        };
        async move { result }.boxed()
    }
}

/// `ts` (cut to whole seconds) in zone `tz` as RFC 3339; UTC prints as `Z`.
pub fn format_time(ts: Timestamp, tz: &str) -> Result<String, ToolError> {
    let ts = Timestamp::from_second(ts.as_second()).map_err(|e| ToolError::Failed(e.to_string()))?;
    let tz = tz.trim();
    if tz.eq_ignore_ascii_case("utc") || tz == "Z" {
        return Ok(ts.to_string());
    }
    let offset = match parse_offset(tz) {
        Some(offset) => offset?,
        None => TimeZone::get(tz).map_err(|_| unknown_zone(tz))?.to_offset(ts),
    };
    Ok(ts.display_with_offset(offset).to_string())
}

fn unknown_zone(tz: &str) -> ToolError {
    ToolError::Failed(format!(
        "unknown time zone {tz:?}: use UTC, an offset like +02:00, or an IANA name like Europe/Paris"
    ))
}

/// `+HH:MM`, `+HHMM` or `+HH` (and `-`): None when `tz` does not look like an offset at all, so
/// that the caller tries it as an IANA name.
fn parse_offset(tz: &str) -> Option<Result<Offset, ToolError>> {
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|&c| c != ':').collect();
    let well_formed = digits.bytes().all(|b| b.is_ascii_digit())
        && matches!((digits.len(), rest.find(':')), (2, None) | (4, None) | (4, Some(2)));
    if !well_formed {
        return Some(Err(unknown_zone(tz)));
    }
    let hours: i32 = digits[..2].parse().ok()?;
    let minutes: i32 = digits.get(2..).filter(|m| !m.is_empty()).map_or(Some(0), |m| m.parse().ok())?;
    if hours > 23 || minutes > 59 {
        return Some(Err(ToolError::Failed(format!("offset {tz:?} out of range (at most ±23:59)"))));
    }
    Some(Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).map_err(|e| ToolError::Failed(e.to_string())))
}

/// `calculator {"expression": string}` -> the exact value.
pub struct Calculator {
    def: ToolDef,
}

impl Calculator {
    pub fn new() -> Self {
        let def = ToolDef {
            name: "calculator".into(),
            description: "Exact arithmetic on integers and decimals: + - * / % ^ (or **) and parentheses \
                          (e.g. \"(1.5 + 2) * 3^2\"). Results are exact: an integer, a decimal, or a \
                          fraction with a decimal approximation."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "the arithmetic expression", "maxLength": calc::MAX_INPUT}
                },
                "required": ["expression"],
                "additionalProperties": false
            }),
        };
        Calculator { def }
    }
}

impl Default for Calculator {
    fn default() -> Self {
        Self::new()
    }
}

impl Tool for Calculator {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        // Evaluated here, synchronously: bounded by calc's input and size caps to well under a
        // millisecond-scale budget, so a blocking-pool hop would cost more than it saves.
        let result = match args.get("expression") {
            Some(Value::String(expr)) => calc::calculate(expr).map_err(|e| ToolError::Failed(e.to_string())),
            _ => Err(ToolError::Failed("missing string argument \"expression\"".into())),
        };
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn time_formats() {
        let t = ts("2026-03-29T00:30:00.75Z");
        assert_eq!(format_time(t, "UTC").unwrap(), "2026-03-29T00:30:00Z");
        assert_eq!(format_time(t, "utc").unwrap(), "2026-03-29T00:30:00Z");
        assert_eq!(format_time(t, "+02:00").unwrap(), "2026-03-29T02:30:00+02:00");
        assert_eq!(format_time(t, "-0530").unwrap(), "2026-03-28T19:00:00-05:30");
        assert_eq!(format_time(t, "+09").unwrap(), "2026-03-29T09:30:00+09:00");
        // Paris switches to summer time at 01:00 UTC that day: the zone, not a fixed offset.
        assert_eq!(format_time(t, "Europe/Paris").unwrap(), "2026-03-29T01:30:00+01:00");
        assert_eq!(format_time(ts("2026-03-29T01:30:00Z"), "Europe/Paris").unwrap(), "2026-03-29T03:30:00+02:00");
        assert_eq!(format_time(t, "Asia/Kolkata").unwrap(), "2026-03-29T06:00:00+05:30");
        for bad in ["Mars/Olympus", "+2:00", "+24:00", "+02:60", "+0a:00", "-", "+02:0"] {
            let err = format_time(t, bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn tools_answer() {
        let now = CurrentTime::new().call(json!({})).await.unwrap();
        let parsed: Timestamp = now.parse().unwrap();
        assert!((Timestamp::now().as_second() - parsed.as_second()).abs() <= 2, "{now}");
        let paris = CurrentTime::new().call(json!({"timezone": "Europe/Paris"})).await.unwrap();
        assert!(paris.ends_with("+01:00") || paris.ends_with("+02:00"), "{paris}");
        assert!(CurrentTime::new().call(json!({"timezone": 3})).await.is_err());

        let calc = Calculator::new();
        assert_eq!(calc.call(json!({"expression": "0.1 + 0.2"})).await.unwrap(), "0.3");
        let err = calc.call(json!({"expression": "1/0"})).await.unwrap_err();
        assert_eq!(err.to_string(), "division by zero");
        assert!(calc.call(json!({})).await.is_err());
    }
}
