//! The versions of the WIT contract this host speaks, and the one way the
//! runtime calls a plugin whatever version it was built against.
//!
//! Each version is bound with `wasmtime::component::bindgen!` in a module of
//! its own (`bindings.rs`, re-exported here): [`v0_4`] from `wit/plugin.wit`
//! (the current contract: plugin state, configuration, `on-tick` and
//! `host.punch`), [`v0_3`] from the frozen `wit/v0.3/plugin.wit` (whose
//! `handle` receives a [`RequestContext`]) and [`v0_2`] from the frozen
//! `wit/v0.2/plugin.wit`. wasmtime matches a 0.x package only up to its
//! minor version, so each minor version is a separate contract: the linker
//! carries the `host` imports of every version side by side, and
//! [`ContractPre::detect`] type-checks a component against each version's
//! `service` export, newest first, and keeps the first that fits. A
//! component that names a version this host does not speak is refused
//! before that, with [`unknown_versions`] naming it.
//!
//! How it fits: the runtime (`runtime.rs`) loads through
//! [`ContractPre::detect`] and runs every call through
//! [`ContractPre::instantiate`] and a [`ContractInstance`] method; the host
//! side of the imports, for every version, is in `instance.rs`.

use std::net::{Ipv4Addr, SocketAddr};

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store};

use super::instance::RequestState;

pub use super::bindings::{v0_2, v0_3, v0_4};

/// The WIT package every contract version belongs to.
pub const PACKAGE: &str = "grenache:plugin";

/// The contract versions this host speaks, newest first.
pub const VERSIONS: &[ContractVersion] = &[
    ContractVersion::V0_4,
    ContractVersion::V0_3,
    ContractVersion::V0_2,
];

/// A version of `grenache:plugin` that a plugin was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContractVersion {
    /// `grenache:plugin@0.4.0`: plugin state, configuration, `on-tick`,
    /// `host.punch`.
    V0_4,
    /// `grenache:plugin@0.3.0`: `handle` receives a `request-context`.
    V0_3,
    /// `grenache:plugin@0.2.0`: `handle(service, payload)`, no context.
    V0_2,
}

impl ContractVersion {
    /// The version as WIT writes it, e.g. `0.3.0`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContractVersion::V0_4 => "0.4.0",
            ContractVersion::V0_3 => "0.3.0",
            ContractVersion::V0_2 => "0.2.0",
        }
    }

    /// Whether wasmtime would match `version` (from a component's import or
    /// export name) to this one: 0.x versions match up to the minor version.
    fn matches(self, version: &str) -> bool {
        let mut theirs = version.split('.');
        let mut ours = self.as_str().split('.');
        let major = theirs.next();
        major == ours.next() && (major != Some("0") || theirs.next() == ours.next())
    }
}

impl std::fmt::Display for ContractVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PACKAGE}@{}", self.as_str())
    }
}

/// The versions of `grenache:plugin` that `component` imports or exports
/// and this host does not speak (e.g. a plugin built against a newer WIT),
/// each written `0.4.0`. Empty when every version it names is known.
pub fn unknown_versions(engine: &Engine, component: &Component) -> Vec<String> {
    let ty = component.component_type();
    let names = ty
        .imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name));
    let mut unknown: Vec<String> = names
        .filter_map(|name| {
            let (package, rest) = name.split_once('/')?;
            let (_, version) = rest.split_once('@')?;
            (package == PACKAGE).then_some(version)
        })
        .filter(|version| !VERSIONS.iter().any(|v| v.matches(version)))
        .map(str::to_owned)
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// Whether `component` imports the `state` interface (0.4.0 on). A plugin
/// that never calls it does not import it (wit-component keeps only the
/// imports a module uses), so the host opens, creates and locks state only
/// for plugins that keep some.
pub fn imports_state(engine: &Engine, component: &Component) -> bool {
    component.component_type().imports(engine).any(|(name, _)| {
        name.strip_prefix(PACKAGE)
            .and_then(|rest| rest.strip_prefix("/state@"))
            .is_some()
    })
}

/// Links the `host` imports of every contract version into `linker`.
pub fn add_to_linker(linker: &mut Linker<RequestState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    v0_4::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v0_3::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v0_2::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// What the host tells a plugin about one request besides its service and
/// payload: the WIT `request-context` of 0.3.0 and later. Plugins built
/// against 0.2.0 do not receive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestContext {
    /// The caller's address as this host observed it (the UDP source address
    /// of its socket; its NAT's mapping when it is behind one).
    pub caller: SocketAddr,
}

impl RequestContext {
    /// The caller of a request that came from no network (`invoke`): the
    /// unspecified address, `0.0.0.0:0`, as the WIT documents.
    pub const NO_CALLER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

    /// The context of a request from `caller`.
    pub fn from_caller(caller: SocketAddr) -> Self {
        RequestContext { caller }
    }

    /// The context of a request made in this process, with no network
    /// caller: [`NO_CALLER`](Self::NO_CALLER).
    pub fn local() -> Self {
        Self::from_caller(Self::NO_CALLER)
    }

    fn to_wit(self) -> v0_4::grenache::plugin::types::RequestContext {
        v0_4::grenache::plugin::types::RequestContext {
            caller: self.caller.to_string(),
        }
    }

    fn to_wit_v0_3(self) -> v0_3::grenache::plugin::types::RequestContext {
        v0_3::grenache::plugin::types::RequestContext {
            caller: self.caller.to_string(),
        }
    }
}

/// What a plugin's `manifest` returned, whatever its contract version;
/// older versions have no `tick-interval-ms` (`None`: never ticked).
pub type Manifest = v0_4::grenache::plugin::types::PluginManifest;

/// The manifest of an older version, as the current one.
macro_rules! manifest_from {
    ($version:ident) => {
        impl From<$version::grenache::plugin::types::PluginManifest> for Manifest {
            fn from(m: $version::grenache::plugin::types::PluginManifest) -> Self {
                Manifest {
                    serves: m.serves,
                    punch: m.punch,
                    calls: m.calls,
                    tick_interval_ms: None,
                }
            }
        }
    };
}
manifest_from!(v0_3);
manifest_from!(v0_2);

/// A component type-checked against one contract version, ready to be
/// instantiated for each call.
pub enum ContractPre {
    /// Built against 0.4.0.
    V0_4(v0_4::PluginPre<RequestState>),
    /// Built against 0.3.0.
    V0_3(v0_3::PluginPre<RequestState>),
    /// Built against 0.2.0.
    V0_2(v0_2::PluginPre<RequestState>),
}

impl ContractPre {
    /// Finds the contract version whose `service` export `pre`'s component
    /// has, newest first. The error says why each version did not fit.
    pub fn detect(pre: InstancePre<RequestState>) -> wasmtime::Result<Self> {
        let as_v0_4 = match v0_4::PluginPre::new(pre.clone()) {
            Ok(pre) => return Ok(ContractPre::V0_4(pre)),
            Err(e) => e,
        };
        let as_v0_3 = match v0_3::PluginPre::new(pre.clone()) {
            Ok(pre) => return Ok(ContractPre::V0_3(pre)),
            Err(e) => e,
        };
        v0_2::PluginPre::new(pre)
            .map(ContractPre::V0_2)
            .map_err(|as_v0_2| {
                wasmtime::format_err!(
                    "as {}: {as_v0_4:#}; as {}: {as_v0_3:#}; as {}: {as_v0_2:#}",
                    ContractVersion::V0_4,
                    ContractVersion::V0_3,
                    ContractVersion::V0_2
                )
            })
    }

    /// The contract version the component was built against.
    pub fn version(&self) -> ContractVersion {
        match self {
            ContractPre::V0_4(_) => ContractVersion::V0_4,
            ContractPre::V0_3(_) => ContractVersion::V0_3,
            ContractPre::V0_2(_) => ContractVersion::V0_2,
        }
    }

    /// A new instance in `store`.
    pub async fn instantiate(
        &self,
        store: &mut Store<RequestState>,
    ) -> wasmtime::Result<ContractInstance> {
        Ok(match self {
            ContractPre::V0_4(pre) => ContractInstance::V0_4(pre.instantiate_async(store).await?),
            ContractPre::V0_3(pre) => ContractInstance::V0_3(pre.instantiate_async(store).await?),
            ContractPre::V0_2(pre) => ContractInstance::V0_2(pre.instantiate_async(store).await?),
        })
    }
}

/// One instance of a plugin; its methods are the `service` exports, called
/// the way the plugin's contract version defines them.
pub enum ContractInstance {
    /// Built against 0.4.0.
    V0_4(v0_4::Plugin),
    /// Built against 0.3.0.
    V0_3(v0_3::Plugin),
    /// Built against 0.2.0.
    V0_2(v0_2::Plugin),
}

impl ContractInstance {
    /// `service.manifest()`.
    pub async fn manifest(&self, store: &mut Store<RequestState>) -> wasmtime::Result<Manifest> {
        match self {
            ContractInstance::V0_4(p) => p.grenache_plugin_service().call_manifest(store).await,
            ContractInstance::V0_3(p) => p
                .grenache_plugin_service()
                .call_manifest(store)
                .await
                .map(Manifest::from),
            ContractInstance::V0_2(p) => p
                .grenache_plugin_service()
                .call_manifest(store)
                .await
                .map(Manifest::from),
        }
    }

    /// `service.handle(service, payload, context)`; a 0.2.0 plugin is called
    /// without the context.
    pub async fn handle(
        &self,
        store: &mut Store<RequestState>,
        service: &str,
        payload: &str,
        context: &RequestContext,
    ) -> wasmtime::Result<Result<String, String>> {
        match self {
            ContractInstance::V0_4(p) => {
                p.grenache_plugin_service()
                    .call_handle(store, service, payload, &context.to_wit())
                    .await
            }
            ContractInstance::V0_3(p) => {
                p.grenache_plugin_service()
                    .call_handle(store, service, payload, &context.to_wit_v0_3())
                    .await
            }
            ContractInstance::V0_2(p) => {
                p.grenache_plugin_service()
                    .call_handle(store, service, payload)
                    .await
            }
        }
    }

    /// `service.on-punch(peer)`.
    pub async fn on_punch(
        &self,
        store: &mut Store<RequestState>,
        peer: &str,
    ) -> wasmtime::Result<()> {
        let peer = peer.to_string();
        match self {
            ContractInstance::V0_4(p) => {
                p.grenache_plugin_service()
                    .call_on_punch(store, &peer)
                    .await
            }
            ContractInstance::V0_3(p) => {
                p.grenache_plugin_service()
                    .call_on_punch(store, &peer)
                    .await
            }
            ContractInstance::V0_2(p) => {
                p.grenache_plugin_service()
                    .call_on_punch(store, &peer)
                    .await
            }
        }
    }
}

impl ContractInstance {
    /// `service.on-tick()`; `Ok(Ok(()))` for a plugin built against a
    /// version without it (the runtime never ticks those).
    pub async fn on_tick(
        &self,
        store: &mut Store<RequestState>,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            ContractInstance::V0_4(p) => p.grenache_plugin_service().call_on_tick(store).await,
            ContractInstance::V0_3(_) | ContractInstance::V0_2(_) => Ok(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_the_way_wasmtime_matches_them() {
        assert!(ContractVersion::V0_4.matches("0.4.0"));
        assert!(ContractVersion::V0_4.matches("0.4.3"));
        assert!(!ContractVersion::V0_4.matches("0.5.0"));
        assert!(ContractVersion::V0_3.matches("0.3.0"));
        assert!(ContractVersion::V0_3.matches("0.3.7"));
        assert!(!ContractVersion::V0_3.matches("0.2.0"));
        assert!(!ContractVersion::V0_3.matches("0.4.0"));
        assert!(ContractVersion::V0_2.matches("0.2.1"));
        assert!(!ContractVersion::V0_2.matches("1.0.0"));
        assert_eq!(VERSIONS[0], ContractVersion::V0_4, "newest first");
        assert_eq!(ContractVersion::V0_2.to_string(), "grenache:plugin@0.2.0");
    }

    /// A component that exports an empty instance under each of `names`.
    #[cfg(feature = "compiler")]
    fn exporting(engine: &Engine, names: &[&str]) -> Component {
        let exports: String = names
            .iter()
            .map(|n| format!("(export \"{n}\" (instance $i))"))
            .collect();
        let text = format!("(component (instance $i) {exports})");
        Component::new(engine, wat::parse_str(text).unwrap()).unwrap()
    }

    #[test]
    #[cfg(feature = "compiler")]
    fn unknown_versions_are_named_and_known_ones_are_not() {
        let engine = Engine::default();
        let newer = exporting(
            &engine,
            &[
                "grenache:plugin/service@0.5.0",
                "grenache:plugin/types@0.5.0",
                "other:pkg/service@9.0.0",
            ],
        );
        assert_eq!(unknown_versions(&engine, &newer), ["0.5.0"]);
        let known = exporting(
            &engine,
            &[
                "grenache:plugin/service@0.4.1",
                "grenache:plugin/state@0.4.0",
                "grenache:plugin/service@0.3.2",
                "grenache:plugin/types@0.2.0",
            ],
        );
        assert!(unknown_versions(&engine, &known).is_empty());
    }

    #[test]
    fn a_local_request_has_the_unspecified_caller() {
        assert_eq!(RequestContext::local().caller.to_string(), "0.0.0.0:0");
    }
}
