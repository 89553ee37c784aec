//! What a run costs, from the price list the operator configures (`kiln serve --price-input
//! --price-output [--price-cached-input]`, USD per million tokens, as providers publish them).
//! Owns that arithmetic. Must not guess: with no prices set a cost is unknown (`None`, shown as
//! `null`), never 0.

use crate::history::Usage;
use serde::Serialize;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub input: f64,
    /// Prompt tokens whose K/V was reused (providers bill them lower).
    pub cached_input: f64,
    pub output: f64,
}

/// A run's cost by kind of token, in `currency`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    pub currency: &'static str,
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
    pub total: f64,
}

impl Prices {
    pub fn cost(&self, u: &Usage) -> Cost {
        let per_token = |n: usize, price: f64| n as f64 * price / 1e6;
        let input = per_token(u.prompt_tokens.saturating_sub(u.cached_tokens), self.input);
        let cached_input = per_token(u.cached_tokens, self.cached_input);
        let output = per_token(u.completion_tokens, self.output);
        Cost { currency: "USD", input, cached_input, output, total: input + cached_input + output }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_are_billed_at_their_own_price() {
        let p = Prices { input: 1.0, cached_input: 0.25, output: 4.0 };
        let u = Usage {
            prompt_tokens: 3_000_000,
            cached_tokens: 2_000_000,
            completion_tokens: 500_000,
            ..Usage::default()
        };
        let c = p.cost(&u);
        assert_eq!((c.input, c.cached_input, c.output, c.total), (1.0, 0.5, 2.0, 3.5));
    }
}
