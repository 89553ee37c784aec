//! Calculator tests: worked examples, every error, and properties against i128 arithmetic.

use super::*;
use proptest::prelude::*;

fn calc(s: &str) -> String {
    calculate(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn examples() {
    let cases = [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("0.1+0.2", "0.3"),
        ("0.1*3", "0.3"),
        ("1/4", "0.25"),
        ("-1/8", "-0.125"),
        ("10/4", "2.5"),
        ("1/3", "1/3 ≈ 0.33333333333333333333"),
        ("-2/3", "-2/3 ≈ -0.66666666666666666667"),
        ("1/(3*10^30)", "1/3000000000000000000000000000000 ≈ 0.00000000000000000000000000000033333333333333333333"),
        ("2^10", "1024"),
        ("2^-2", "0.25"),
        ("-2^2", "-4"),
        ("(-2)^3", "-8"),
        ("2^3^2", "512"),
        ("2 ** 3 ** 2", "512"),
        ("-2**2", "-4"),
        ("2**-1 * 3", "1.5"),
        ("(-1)^1000001", "-1"),
        ("1^100000000000000000000", "1"),
        ("0^0", "1"),
        ("0^5", "0"),
        ("7 % 3", "1"),
        ("-7 % 3", "-1"),
        ("7 % -3", "1"),
        ("5.5 % 2", "1.5"),
        ("--3", "3"),
        ("+3 - -3", "6"),
        (" 1.5 * .5 ", "0.75"),
        ("3.", "3"),
        ("2^64", "18446744073709551616"),
        ("123456789012345678901234567890 * 10", "1234567890123456789012345678900"),
        ("(((((1)))))", "1"),
    ];
    for (expr, want) in cases {
        assert_eq!(calc(expr), want, "{expr}");
    }
}

#[test]
fn errors() {
    use CalcError::*;
    let err = |s: &str| calculate(s).unwrap_err();
    assert_eq!(err(""), Empty);
    assert_eq!(err("   "), Empty);
    assert_eq!(err("1/0"), DivisionByZero);
    assert_eq!(err("1/(2-2)"), DivisionByZero);
    assert_eq!(err("5 % 0"), DivisionByZero);
    assert_eq!(err("0^-1"), DivisionByZero);
    assert_eq!(err("4^0.5"), NonIntegerExponent("0.5".into()));
    assert_eq!(err("9^9^9"), TooLarge);
    assert_eq!(err("2^100000"), TooLarge);
    assert_eq!(err("10^20000 * 10^20000"), TooLarge);
    assert_eq!(err("2^-100000"), TooLarge);
    assert_eq!(err(&"1+".repeat(600)), TooLong(1200));
    assert_eq!(err(&format!("{}1{}", "(".repeat(200), ")".repeat(200))), TooDeep);
    assert_eq!(err(&format!("{}1", "-".repeat(500))), TooDeep);
    let syntax =
        [("1 +", 3), ("1 2", 2), ("(1", 2), ("1)", 1), ("abc", 0), ("1 + é", 4), (".", 0), ("2 * * 3", 4), ("2 *", 3)];
    for (s, at) in syntax {
        match err(s) {
            Syntax { pos, .. } => assert_eq!(pos, at, "{s}"),
            e => panic!("{s}: {e}"),
        }
    }
    assert_eq!(err("1 2").to_string(), "unexpected '2' at position 2; expected an operator or the end");
    assert_eq!(err("1 +").to_string(), "unexpected end of expression at position 3; expected a number or '('");
}

/// An expression tree over small integers, printed fully parenthesised, with its i128 value
/// (None when i128 overflows or a division is inexact/by zero: then the calculator is checked
/// against exact rational arithmetic instead).
#[derive(Debug, Clone)]
enum E {
    Num(i64),
    Bin(Box<E>, char, Box<E>),
    Neg(Box<E>),
}

impl E {
    fn text(&self) -> String {
        match self {
            E::Num(n) if *n < 0 => format!("({n})"),
            E::Num(n) => n.to_string(),
            E::Bin(a, op, b) => format!("({} {op} {})", a.text(), b.text()),
            E::Neg(a) => format!("-{}", a.text()),
        }
    }

    fn value(&self) -> Option<i128> {
        match self {
            E::Num(n) => Some(*n as i128),
            E::Neg(a) => a.value()?.checked_neg(),
            E::Bin(a, op, b) => {
                let (a, b) = (a.value()?, b.value()?);
                match op {
                    '+' => a.checked_add(b),
                    '-' => a.checked_sub(b),
                    '*' => a.checked_mul(b),
                    '%' => a.checked_rem(b),
                    '/' if b != 0 && a % b == 0 => Some(a / b),
                    _ => None,
                }
            }
        }
    }
}

fn tree() -> impl Strategy<Value = E> {
    let leaf = (-1_000_000_000i64..1_000_000_000).prop_map(E::Num);
    leaf.prop_recursive(4, 16, 2, |inner| {
        prop_oneof![
            (inner.clone(), prop::sample::select(vec!['+', '-', '*', '/', '%']), inner.clone())
                .prop_map(|(a, op, b)| E::Bin(Box::new(a), op, Box::new(b))),
            inner.prop_map(|a| E::Neg(Box::new(a))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn matches_i128(e in tree()) {
        if let Some(v) = e.value() {
            prop_assert_eq!(calc(&e.text()), v.to_string());
        }
    }

    #[test]
    fn binary_ops_match_i128(a in any::<i64>(), b in any::<i64>(), op in prop::sample::select(vec!['+', '-', '*', '%'])) {
        let (x, y) = (a as i128, b as i128);
        let want = match op { '+' => Some(x + y), '-' => Some(x - y), '*' => Some(x * y), _ => x.checked_rem(y) };
        let got = calculate(&format!("{a} {op} ({b})"));
        match want {
            Some(w) => prop_assert_eq!(got.unwrap(), w.to_string()),
            None => prop_assert_eq!(got.unwrap_err(), CalcError::DivisionByZero),
        }
    }

    #[test]
    fn division_is_exact(a in any::<i64>(), b in any::<i64>().prop_filter("nonzero", |b| *b != 0)) {
        // (a / b) * b gives back a exactly: no rounding anywhere.
        prop_assert_eq!(calc(&format!("({a} / ({b})) * ({b})")), a.to_string());
        let q = evaluate(&format!("{a} / ({b})")).unwrap();
        prop_assert_eq!(q, BigRational::new(a.into(), b.into()));
    }

    #[test]
    fn decimals_are_exact(a in 0u32..1_000_000, b in 0u32..1_000_000) {
        // a/1000 + b/1000 printed = (a+b)/1000 printed exactly, as a decimal.
        let s = calc(&format!("{}.{:03} + {}.{:03}", a / 1000, a % 1000, b / 1000, b % 1000));
        let sum = a + b;
        let want = format!("{}.{:03}", sum / 1000, sum % 1000);
        let want = want.trim_end_matches('0').trim_end_matches('.');
        prop_assert_eq!(s, want);
    }

    #[test]
    fn arbitrary_input_never_panics(s in "[0-9+*/%^(). -]{0,60}") {
        let _ = calculate(&s);
    }
}
