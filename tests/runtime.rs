//! The plugin runtime through its library API: every way a plugin can fail
//! costs one request, and the same plugin answers the next one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use grenache_host::plugin::{
    CallError, ContractVersion, Limits, LoadedPlugin, NoNetwork, RequestContext, Runtime,
};

async fn faulty(limits: Limits) -> LoadedPlugin {
    let runtime = Runtime::new(limits).expect("engine starts");
    runtime
        .load(&common::test_plugin("faulty"), Arc::new(NoNetwork))
        .await
        .expect("the faulty plugin loads")
}

fn test_limits() -> Limits {
    Limits {
        memory_bytes: 32 << 20,
        time: Duration::from_millis(500),
        ..Limits::default()
    }
}

async fn assert_next_request_succeeds(plugin: &LoadedPlugin, after: &str) {
    let reply = plugin.handle("echo", r#"{"after":"x"}"#).await;
    assert_eq!(
        reply.as_deref(),
        Ok(r#"{"after":"x"}"#),
        "echo after {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_fails_one_request_and_the_next_succeeds() {
    let plugin = faulty(test_limits()).await;
    type Case = (&'static str, fn(&CallError) -> bool, &'static str);
    let cases: &[Case] = &[
        (
            "panic",
            |e| matches!(e, CallError::Trap { .. }),
            "panicked on purpose",
        ),
        (
            "unreachable",
            |e| matches!(e, CallError::Trap { .. }),
            "unreachable",
        ),
        (
            "loop",
            |e| matches!(e, CallError::TimeLimit { .. }),
            "time limit of 500ms",
        ),
        (
            "oom",
            |e| matches!(e, CallError::MemoryLimit { .. }),
            "memory limit of 32 MiB",
        ),
        (
            "stack_overflow",
            |e| matches!(e, CallError::Trap { .. }),
            "stack overflow",
        ),
        (
            "huge_reply",
            |e| matches!(e, CallError::BadReply { .. }),
            "limit",
        ),
        (
            "not_json",
            |e| matches!(e, CallError::BadReply { .. }),
            "not JSON",
        ),
    ];
    for (service, is_expected, text) in cases {
        // Twice each: a fault must not leave anything behind for the next one.
        for _ in 0..2 {
            let err = plugin.handle(service, "1").await.expect_err(service);
            assert!(is_expected(&err), "{service}: unexpected {err:?}");
            assert!(err.to_string().contains(text), "{service}: {err}");
            assert_next_request_succeeds(&plugin, service).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_request_does_not_stall_the_others() {
    let plugin = Arc::new(
        faulty(Limits {
            time: Duration::from_secs(2),
            ..test_limits()
        })
        .await,
    );
    let looping = tokio::spawn({
        let plugin = plugin.clone();
        async move { plugin.handle("loop", "1").await }
    });
    // While one request spins, others keep being answered.
    let started = std::time::Instant::now();
    for i in 0..50 {
        let payload = i.to_string();
        assert_eq!(
            plugin.handle("echo", &payload).await.as_deref(),
            Ok(payload.as_str())
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "echo requests were held up by the looping one ({:?})",
        started.elapsed()
    );
    let looped = looping.await.unwrap();
    assert!(
        matches!(looped, Err(CallError::TimeLimit { .. })),
        "{looped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_instance() {
    let plugin = Arc::new(faulty(test_limits()).await);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let plugin = plugin.clone();
            tokio::spawn(async move {
                let service = if i % 4 == 0 { "panic" } else { "echo" };
                (i, plugin.handle(service, &i.to_string()).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        if i % 4 == 0 {
            assert!(
                matches!(result, Err(CallError::Trap { .. })),
                "{i}: {result:?}"
            );
        } else {
            assert_eq!(result, Ok(i.to_string()));
        }
    }
}

/// Nothing a request writes survives it, however the engine recycles
/// instances' memory: every request finds the plugin's globals and 256 KiB
/// of its zeroed data as a fresh instance has them, although each request
/// counted itself and scribbled over all of those bytes. One request at a
/// time reuses the same memory slot; 16 at once spread over several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_request_leaves_in_memory_reaches_the_next() {
    let plugin = Arc::new(faulty(test_limits()).await);
    let fresh = r#"{"calls":1,"dirty":0}"#;
    for i in 0..20 {
        assert_eq!(
            plugin.handle("residue", "1").await.as_deref(),
            Ok(fresh),
            "request {i}"
        );
    }
    for round in 0..5 {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let plugin = plugin.clone();
                tokio::spawn(async move { plugin.handle("residue", "1").await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().as_deref(), Ok(fresh), "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_error_string_passes_through_unchanged() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    let fib = runtime
        .load(&common::plugin("fibonacci"), Arc::new(NoNetwork))
        .await
        .unwrap();
    let err = fib
        .handle("fibonacci_worker", r#"{"length":-1}"#)
        .await
        .unwrap_err();
    match err {
        CallError::Handler(message) => assert!(message.starts_with("length -1 is negative")),
        other => panic!("expected the handler's own message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_punch_runs_the_plugin_callback() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    let consumer = runtime
        .load(&common::plugin("consumer"), Arc::new(NoNetwork))
        .await
        .unwrap();
    // With no network the consumer's request-peer fails; the callback itself
    // must still complete without trapping.
    consumer
        .on_punch("127.0.0.1:4000")
        .await
        .expect("on-punch returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_2_plugin_answers_and_hears_of_punches_without_a_context() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    let legacy = runtime
        .load(&common::test_plugin("legacy-v2"), Arc::new(NoNetwork))
        .await
        .expect("a 0.2.0 plugin loads");
    assert_eq!(legacy.contract(), ContractVersion::V0_2);
    assert_eq!(legacy.serves(), ["legacy"]);
    let caller = RequestContext::from_caller("192.0.2.1:7".parse().unwrap());
    assert_eq!(
        legacy
            .handle_with("legacy", "[1]", &caller)
            .await
            .as_deref(),
        Ok(r#"{"legacy":[1]}"#)
    );
    legacy
        .on_punch("127.0.0.1:4000")
        .await
        .expect("on-punch returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_3_plugin_answers_with_the_callers_address_and_is_never_ticked() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    let legacy = runtime
        .load(&common::test_plugin("legacy-v3"), Arc::new(NoNetwork))
        .await
        .expect("a 0.3.0 plugin loads");
    assert_eq!(legacy.contract(), ContractVersion::V0_3);
    assert_eq!(legacy.serves(), ["legacy_v3"]);
    assert_eq!(legacy.tick_interval(), None);
    assert_eq!(legacy.state_file(), None);
    let caller = RequestContext::from_caller("192.0.2.1:7".parse().unwrap());
    assert_eq!(
        legacy
            .handle_with("legacy_v3", "[1]", &caller)
            .await
            .as_deref(),
        Ok(r#"{"legacy":3,"caller":"192.0.2.1:7","payload":[1]}"#)
    );
    legacy
        .on_punch("127.0.0.1:4000")
        .await
        .expect("on-punch returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_gets_the_callers_address() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    let echo = runtime
        .load(&common::test_plugin("echo-caller"), Arc::new(NoNetwork))
        .await
        .unwrap();
    assert_eq!(echo.contract(), ContractVersion::V0_4);
    let caller = RequestContext::from_caller("[2001:db8::1]:40123".parse().unwrap());
    assert_eq!(
        echo.handle_with("echo_caller", "{}", &caller)
            .await
            .as_deref(),
        Ok(r#""[2001:db8::1]:40123""#)
    );
    assert_eq!(
        echo.handle("echo_caller", "{}").await.as_deref(),
        Ok(r#""0.0.0.0:0""#)
    );
}
