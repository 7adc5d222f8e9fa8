//! `programs` (general): straight-line programs of two to four statements (assignments of a
//! literal, `v + w`, `v - 3`, an increment, a swap `x, y = y, x`) ending in `print(v)`.
//!
//! Literals are 0-9 and every value a program computes stays in 0-20, so the answer is a
//! small number; a statement that would leave that range is drawn again.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

pub(crate) const VARS: &[&str] = &["x", "y", "z", "u", "v", "w", "p", "q", "r", "k", "m", "n"];

const MAX_VALUE: i64 = 20;

/// A right-hand side operand.
enum Term {
    Lit(i64),
    Var(usize),
}

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    // (name, value) of the variables defined so far, in definition order.
    let mut vars: Vec<(&'static str, i64)> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let n_statements = rng.random_range(2..=4);
    while lines.len() < n_statements {
        if vars.is_empty() {
            let name = *pick(rng, VARS);
            let v = rng.random_range(0..=9);
            vars.push((name, v));
            lines.push(format!("{name} = {v}"));
            continue;
        }
        match rng.random_range(0..10) {
            // A swap needs two variables; it changes which name holds which value.
            0 if vars.len() >= 2 => {
                let i = rng.random_range(0..vars.len());
                let j = rng.random_range(0..vars.len());
                if i == j {
                    continue;
                }
                let (vi, vj) = (vars[i].1, vars[j].1);
                vars[i].1 = vj;
                vars[j].1 = vi;
                let (a, b) = (vars[i].0, vars[j].0);
                lines.push(format!("{a}, {b} = {b}, {a}"));
            }
            // A fresh literal.
            1 => {
                let name = *pick(rng, VARS);
                let v = rng.random_range(0..=9);
                assign(&mut vars, name, v);
                lines.push(format!("{name} = {v}"));
            }
            // `target = left op right`, the target new or existing.
            _ => {
                let left = rng.random_range(0..vars.len());
                let right = if rng.random_bool(0.5) {
                    Term::Lit(rng.random_range(1..=9))
                } else {
                    Term::Var(rng.random_range(0..vars.len()))
                };
                let plus = rng.random_bool(0.5);
                let r = match right {
                    Term::Lit(l) => l,
                    Term::Var(i) => vars[i].1,
                };
                let value = if plus {
                    vars[left].1 + r
                } else {
                    vars[left].1 - r
                };
                if !(0..=MAX_VALUE).contains(&value) {
                    continue;
                }
                let target = *pick(rng, VARS);
                let rhs = match right {
                    Term::Lit(l) => l.to_string(),
                    Term::Var(i) => vars[i].0.to_string(),
                };
                let op = if plus { "+" } else { "-" };
                lines.push(format!("{target} = {} {op} {rhs}", vars[left].0));
                assign(&mut vars, target, value);
            }
        }
    }
    let (name, value) = *pick(rng, &vars);
    lines.push(format!("print({name})"));
    (lines.join("\n"), value.to_string())
}

fn assign(vars: &mut Vec<(&'static str, i64)>, name: &'static str, value: i64) {
    match vars.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = value,
        None => vars.push((name, value)),
    }
}
