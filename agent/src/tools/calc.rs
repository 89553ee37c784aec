//! The calculator builtin's arithmetic: a recursive-descent parser over `+ - * / % ^` (or `**`), parentheses,
//! unary minus, integers and decimals, evaluated exactly with big rationals (0.1 + 0.2 is 0.3).
//! It owns parsing, evaluation and printing; it must never panic, never use floats, and never let
//! one expression take unbounded time or memory (input length, nesting and result size are capped).

use num_bigint::BigInt;
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// Longest accepted expression, in bytes.
pub const MAX_INPUT: usize = 1000;
/// Deepest nesting of parentheses and unary signs (the parser recurses once per level).
const MAX_DEPTH: usize = 100;
/// Largest numerator or denominator of any intermediate result, in bits (~20 000 decimal digits):
/// `9^9^9` must be refused up front, not computed.
const MAX_BITS: u64 = 65_536;
/// Digits after the point in the approximation of a non-terminating result.
const APPROX_DIGITS: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalcError {
    #[error("expression is empty")]
    Empty,
    #[error("expression is too long ({0} bytes, at most {MAX_INPUT})")]
    TooLong(usize),
    #[error("expression nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("unexpected {found} at position {pos}; expected {expected}")]
    Syntax { pos: usize, found: String, expected: &'static str },
    #[error("division by zero")]
    DivisionByZero,
    #[error("exponent must be an integer for an exact result (got {0})")]
    NonIntegerExponent(String),
    #[error("result too large (over {MAX_BITS} bits)")]
    TooLarge,
}

/// Evaluates `expr` exactly and prints the result (see `format_rational`).
pub fn calculate(expr: &str) -> Result<String, CalcError> {
    evaluate(expr).map(|q| format_rational(&q))
}

/// Evaluates `expr` exactly.
pub fn evaluate(expr: &str) -> Result<BigRational, CalcError> {
    if expr.len() > MAX_INPUT {
        return Err(CalcError::TooLong(expr.len()));
    }
    if expr.trim().is_empty() {
        return Err(CalcError::Empty);
    }
    let mut p = Parser { src: expr.as_bytes(), pos: 0, depth: 0 };
    let value = p.expr()?;
    p.skip_ws();
    if p.pos < p.src.len() {
        return Err(p.unexpected("an operator or the end"));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.src.get(self.pos).is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// The next non-space byte, consumed if it is one of `ops`.
    fn eat(&mut self, ops: &[u8]) -> Option<u8> {
        self.skip_ws();
        let b = *self.src.get(self.pos)?;
        ops.contains(&b).then(|| {
            self.pos += 1;
            b
        })
    }

    fn unexpected(&self, expected: &'static str) -> CalcError {
        // `pos` is always at an ASCII byte or the end (we only step over ASCII), so slicing is safe.
        let found = match std::str::from_utf8(&self.src[self.pos..]).ok().and_then(|s| s.chars().next()) {
            Some(c) => format!("{c:?}"),
            None => "end of expression".to_string(),
        };
        CalcError::Syntax { pos: self.pos, found, expected }
    }

    fn descend(&mut self) -> Result<(), CalcError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CalcError::TooDeep);
        }
        Ok(())
    }

    /// expr := term (('+' | '-') term)*
    fn expr(&mut self) -> Result<BigRational, CalcError> {
        let mut acc = self.term()?;
        while let Some(op) = self.eat(b"+-") {
            let rhs = self.term()?;
            acc = checked(if op == b'+' { acc + rhs } else { acc - rhs })?;
        }
        Ok(acc)
    }

    /// term := unary (('*' | '/' | '%') unary)*
    fn term(&mut self) -> Result<BigRational, CalcError> {
        let mut acc = self.unary()?;
        while let Some(op) = self.eat(b"*/%") {
            let rhs = self.unary()?;
            acc = match op {
                b'*' => checked(acc * rhs)?,
                _ if rhs.is_zero() => return Err(CalcError::DivisionByZero),
                b'/' => checked(acc / rhs)?,
                // Remainder with the sign of the dividend, as in Rust, C and Python's math.fmod.
                _ => checked(&acc - &rhs * (&acc / &rhs).trunc())?,
            };
        }
        Ok(acc)
    }

    /// unary := ('-' | '+') unary | power. Unary minus binds looser than `^`: -2^2 is -4.
    fn unary(&mut self) -> Result<BigRational, CalcError> {
        if let Some(op) = self.eat(b"-+") {
            self.descend()?;
            let v = self.unary()?;
            self.depth -= 1;
            return Ok(if op == b'-' { -v } else { v });
        }
        self.power()
    }

    /// power := primary (('^' | '**') unary)?, right-associative: 2^3^2 is 2^9. `**` because
    /// models trained on Python write it; it is read here, before `term` could see two `*`.
    fn power(&mut self) -> Result<BigRational, CalcError> {
        let base = self.primary()?;
        self.skip_ws();
        if self.src[self.pos..].starts_with(b"**") {
            self.pos += 2;
        } else if self.eat(b"^").is_none() {
            return Ok(base);
        }
        self.descend()?;
        let exp = self.unary()?;
        self.depth -= 1;
        pow(base, &exp)
    }

    /// primary := number | '(' expr ')'
    fn primary(&mut self) -> Result<BigRational, CalcError> {
        if self.eat(b"(").is_some() {
            self.descend()?;
            let v = self.expr()?;
            self.depth -= 1;
            if self.eat(b")").is_none() {
                return Err(self.unexpected("')'"));
            }
            return Ok(v);
        }
        self.number()
    }

    /// number := digits ('.' digits?)? | '.' digits
    fn number(&mut self) -> Result<BigRational, CalcError> {
        self.skip_ws();
        let start = self.pos;
        let int_end = self.digits_end(start);
        let (frac_start, end) = if self.src.get(int_end) == Some(&b'.') {
            (int_end + 1, self.digits_end(int_end + 1))
        } else {
            (int_end, int_end)
        };
        if int_end == start && end == frac_start {
            return Err(self.unexpected("a number or '('"));
        }
        self.pos = end;
        // Only ASCII digits between these bounds: from_utf8 and parse cannot fail, but map anyway.
        let text = |a: usize, b: usize| std::str::from_utf8(&self.src[a..b]).unwrap_or("");
        let digits = format!("{}{}", text(start, int_end), text(frac_start, end));
        let numer: BigInt = digits.parse().map_err(|_| self.unexpected("a number"))?;
        let denom = BigInt::from(10u32).pow((end - frac_start) as u32);
        checked(BigRational::new(numer, denom))
    }

    fn digits_end(&self, mut i: usize) -> usize {
        while self.src.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    }
}

fn bits(q: &BigRational) -> u64 {
    q.numer().bits().max(q.denom().bits())
}

fn checked(q: BigRational) -> Result<BigRational, CalcError> {
    if bits(&q) > MAX_BITS {
        Err(CalcError::TooLarge)
    } else {
        Ok(q)
    }
}

/// `base ^ exp` for an integer `exp`, refusing before computing anything too large.
fn pow(base: BigRational, exp: &BigRational) -> Result<BigRational, CalcError> {
    if !exp.is_integer() {
        return Err(CalcError::NonIntegerExponent(format_rational(exp)));
    }
    if base.is_zero() {
        return match exp.numer().sign() {
            num_bigint::Sign::Minus => Err(CalcError::DivisionByZero),
            num_bigint::Sign::NoSign => Ok(BigRational::one()),
            num_bigint::Sign::Plus => Ok(BigRational::zero()),
        };
    }
    // 1 and -1 stay small for any exponent; everything else grows by bits(base) per step.
    if base.abs().is_one() {
        let odd = exp.numer().is_odd();
        return Ok(if base.is_negative() && odd { -BigRational::one() } else { BigRational::one() });
    }
    let e = exp.numer().abs().to_u64().filter(|e| e.saturating_mul(bits(&base).saturating_sub(1).max(1)) <= MAX_BITS);
    let e = e.ok_or(CalcError::TooLarge)?;
    let r = num_traits::pow::Pow::pow(&base, e);
    checked(if exp.is_negative() { r.recip() } else { r })
}

/// Prints an integer as such, a terminating fraction as an exact decimal ("0.3", "-1.25"), and
/// anything else as the reduced fraction with a decimal approximation ("1/3 ≈ 0.33333333333333333333").
pub fn format_rational(q: &BigRational) -> String {
    if q.is_integer() {
        return q.numer().to_string();
    }
    let (twos, fives, rest) = factor_2_5(q.denom());
    if rest.is_one() {
        return decimal(q, twos.max(fives) as usize, false);
    }
    // Enough places to show APPROX_DIGITS significant digits even for a tiny value like 1/3e30.
    let leading_zeros = q.denom().to_string().len().saturating_sub(q.numer().abs().to_string().len());
    format!("{}/{} ≈ {}", q.numer(), q.denom(), decimal(q, APPROX_DIGITS + leading_zeros, true))
}

/// The denominator as 2^a * 5^b * rest.
fn factor_2_5(d: &BigInt) -> (u64, u64, BigInt) {
    let mut rest = d.clone();
    let twos = rest.trailing_zeros().unwrap_or(0);
    rest >>= twos;
    let five = BigInt::from(5u32);
    let mut fives = 0;
    while rest.is_multiple_of(&five) {
        rest /= &five;
        fives += 1;
    }
    (twos, fives, rest)
}

/// `q` with `places` digits after the point: exact when the scaled value is an integer, else
/// rounded half away from zero with trailing zeros dropped.
fn decimal(q: &BigRational, places: usize, approx: bool) -> String {
    let scaled = q.abs() * BigRational::from_integer(BigInt::from(10u32).pow(places as u32));
    let digits = if approx { scaled.round() } else { scaled.trunc() }.to_integer().to_string();
    let digits = format!("{digits:0>width$}", width = places + 1);
    let (int, frac) = digits.split_at(digits.len() - places);
    let frac = frac.trim_end_matches('0');
    let sign = if q.is_negative() { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
#[path = "calc_tests.rs"]
mod tests;
