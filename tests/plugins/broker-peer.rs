// Shared source of the `broker-worker` and `broker-client` test plugins
// (each includes it with `#[path]`, beside the broker's `registry.rs`):
// registering with the tutorial's `fibo_broker` and punching the peers of
// the other role that it lists, as the tutorial's `register.js` and
// `nat_server.js` do.

use crate::grenache::plugin::host::{log, punch, request};
use crate::grenache::plugin::types::Level;
use crate::registry;

/// The broker's service.
pub const BROKER: &str = "fibo_broker";

/// The service both peers register for.
pub const SERVICE: &str = "fibonacci_worker";

/// How often both peers register (and so punch), in milliseconds: the
/// tutorial's `nat_server.js` interval, well within the broker's 15 s.
pub const REGISTER_INTERVAL_MS: u32 = 2_000;

/// Most peers punched per registration: the host's punch budget (bursts of
/// 8, refilled at 4 a second, so 8 every 2 s) and one tick's work stay
/// bounded however many peers a broker lists.
pub const MAX_PUNCHES: usize = 8;

const TIMEOUT_MS: u32 = 5_000;

/// Registers this host with the broker, as a server of [`SERVICE`] or as a
/// client, and punches each peer of the other role the broker lists (when
/// `punch`). Both sides must punch: behind port-restricted NATs on both
/// sides, the first punch is dropped by the other side's router and only
/// opens this side's; the other side's punch then gets through.
pub fn register_and_punch(server: bool, punch_peers: bool) -> Result<(), String> {
    let payload = format!(r#"{{"service":"{SERVICE}","server":{server}}}"#);
    let reply = request(BROKER, &payload, TIMEOUT_MS)
        .map_err(|e| format!("cannot register with {BROKER}: {e}"))?;
    let others = if server { "client" } else { "server" };
    for peer in registry::peers(&reply, SERVICE, !server)?
        .iter()
        .take(MAX_PUNCHES)
    {
        if !punch_peers {
            log(
                Level::Info,
                &format!("the broker lists a {others} at {peer}"),
            );
            continue;
        }
        log(
            Level::Info,
            &format!("the broker lists a {others} at {peer}; punching it"),
        );
        if let Err(e) = punch(peer) {
            log(Level::Warn, &format!("cannot punch {peer}: {e}"));
        }
    }
    Ok(())
}
