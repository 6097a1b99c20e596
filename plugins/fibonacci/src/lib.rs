//! `fibonacci_worker`: the worker of Grenache's classic hole-punching example.
//!
//! `{"length": n}` answers the first `n` terms with `f(0) = f(1) = 1`, so
//! `{"length":10}` gives `[1,1,2,3,5,8,13,21,34,55]`.
//!
//! Every answer is exact for every consumer: terms are JSON numbers, and a
//! JavaScript consumer (the Node.js side of Grenache) reads numbers as IEEE
//! doubles, exact only up to 2^53 − 1. So the worker refuses any length whose
//! last term would pass that bound ([`MAX_LENGTH`] = 78) instead of sending a
//! number some consumers would silently round.

#[cfg(target_arch = "wasm32")]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });

    use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};

    struct Fibonacci;

    impl Guest for Fibonacci {
        fn manifest() -> PluginManifest {
            PluginManifest {
                serves: vec![super::SERVICE.to_string()],
                punch: vec!["fibonacci_consumer".to_string()],
                calls: vec![],
                tick_interval_ms: None,
            }
        }

        fn handle(
            service: String,
            payload: String,
            _context: RequestContext,
        ) -> Result<String, String> {
            if service != super::SERVICE {
                return Err(format!(
                    "this plugin serves {}, not {service}",
                    super::SERVICE
                ));
            }
            super::answer(&payload)
        }

        fn on_tick() -> Result<(), String> {
            Ok(())
        }

        fn on_punch(_peer: String) {}
    }

    export!(Fibonacci);
}

/// The Grenache service name this plugin answers.
pub const SERVICE: &str = "fibonacci_worker";

mod sequence;

pub use sequence::{answer, sequence, MAX_LENGTH, MAX_SAFE_INTEGER};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_example() {
        assert_eq!(
            answer(r#"{"length":10}"#).unwrap(),
            "[1,1,2,3,5,8,13,21,34,55]"
        );
    }

    #[test]
    fn every_term_is_the_sum_of_the_two_before_and_the_last_is_safe() {
        let terms = sequence(MAX_LENGTH).unwrap();
        assert_eq!(terms.len() as u64, MAX_LENGTH);
        for w in terms.windows(3) {
            assert_eq!(w[2], w[0] + w[1]);
        }
        let last = *terms.last().unwrap();
        assert!(last <= MAX_SAFE_INTEGER);
        // The next term would not be exact in a JavaScript consumer.
        assert!(terms[terms.len() - 1] + terms[terms.len() - 2] > MAX_SAFE_INTEGER);
    }

    #[test]
    fn small_lengths() {
        assert_eq!(sequence(0).unwrap(), Vec::<u64>::new());
        assert_eq!(sequence(1).unwrap(), vec![1]);
        assert_eq!(sequence(2).unwrap(), vec![1, 1]);
    }

    #[test]
    fn bad_lengths_are_refused_with_a_reason() {
        let cases = [
            (r#"{"length":79}"#, "too large"),
            (r#"{"length":-1}"#, "negative"),
            (r#"{"length":2.5}"#, "not a whole number"),
            (r#"{"length":"10"}"#, "not a whole number"),
            (r#"{}"#, "missing"),
            (r#"[10]"#, "missing"),
            (r#"{"length":"#, "not JSON"),
        ];
        for (payload, reason) in cases {
            let err = answer(payload).unwrap_err();
            assert!(err.contains(reason), "{payload}: {err}");
        }
    }
}
