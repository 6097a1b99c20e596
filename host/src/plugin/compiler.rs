//! Compiling components to machine code with Cranelift: the one part of the
//! plugin runtime that a gateway build leaves out, and the one place that
//! decides what happens without it.
//!
//! With the `compiler` cargo feature (the default) a host loads `.wasm`
//! components and precompiles them (`grenache-host compile`). Without it
//! (`--no-default-features`: wasmtime's runtime only, a binary a fraction of
//! the size) it runs `.cwasm` files that a host with a compiler made for its
//! target, and every path that would compile (loading a `.wasm` for `run`,
//! `swap`, `--watch`, `invoke` and `inspect`, and `compile` itself) ends in
//! [`NoCompiler`], which names the command to run on a build machine.

use std::path::PathBuf;

use wasmtime::component::Component;
use wasmtime::Engine;

/// The target triple this grenache-host was built for (e.g.
/// `aarch64-unknown-linux-gnu`): the `--target` that makes plugins for it.
pub const HOST_TARGET: &str = env!("GRENACHE_HOST_TARGET");

/// This grenache-host was built without the compiler: it cannot load the
/// `.wasm` component at `path`, only a `.cwasm` precompiled for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "this grenache-host has no compiler (a gateway build, without the `compiler` feature); precompile the plugin on a build machine with `grenache-host compile {} --target {HOST_TARGET}` and run the .cwasm it writes here",
    path.display()
)]
pub struct NoCompiler {
    /// The component that would have been compiled.
    pub path: PathBuf,
}

/// Compiles the component `wasm` (from the file at `path`) for `engine`:
/// the outer error when this build has no compiler, the inner one when the
/// component does not compile.
pub fn component(
    engine: &Engine,
    wasm: &[u8],
    path: PathBuf,
) -> Result<wasmtime::Result<Component>, NoCompiler> {
    #[cfg(feature = "compiler")]
    {
        let _ = path;
        Ok(Component::from_binary(engine, wasm))
    }
    #[cfg(not(feature = "compiler"))]
    {
        let _ = (engine, wasm);
        Err(NoCompiler { path })
    }
}

/// Precompiles the component `wasm` (from the file at `path`) for `engine`'s
/// target into a `.cwasm` artifact; errors as for [`component`].
pub fn precompile(
    engine: &Engine,
    wasm: &[u8],
    path: PathBuf,
) -> Result<wasmtime::Result<Vec<u8>>, NoCompiler> {
    #[cfg(feature = "compiler")]
    {
        let _ = path;
        Ok(engine.precompile_component(wasm))
    }
    #[cfg(not(feature = "compiler"))]
    {
        let _ = (engine, wasm);
        Err(NoCompiler { path })
    }
}

/// Whether this build can compile: `Ok`, or why not for the file at `path`.
pub fn available(path: PathBuf) -> Result<(), NoCompiler> {
    if cfg!(feature = "compiler") {
        Ok(())
    } else {
        Err(NoCompiler { path })
    }
}
