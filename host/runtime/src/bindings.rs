//! The one place `bindgen!` runs. The `imports` world generates the host side of everything a
//! plugin may import; each role world maps those imports onto it with `with:` and adds only its
//! export, so the three roles share one set of host types.

#![allow(missing_docs, clippy::all)]

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "weft:plugin/imports",
    // Only `compute` awaits (the model); every other import returns at once, so it is a plain
    // call: no boxed future and no poll per call (a model call makes about a dozen of them).
    imports: {
        "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
        default: trappable,
    },
    with: {
        "weft:plugin/types.tensor": crate::tensors::HostTensor,
        "wasi:nn/tensor.tensor": crate::nn::NnTensor,
        "wasi:nn/graph.graph": crate::nn::NnGraph,
        "wasi:nn/inference.graph-execution-context": crate::nn::NnContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
});

/// Generates one role world's bindings, mapping every import onto the shared ones above (so the
/// imports keep the flags chosen there: only `compute` is async).
macro_rules! role_world {
    ($module:ident, $world:literal) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: "../../wit",
                world: $world,
                exports: { default: async },
                with: {
                    "weft:plugin/types": super::weft::plugin::types,
                    "weft:plugin/host": super::weft::plugin::host,
                    "wasi:nn/tensor": super::wasi::nn::tensor,
                    "wasi:nn/graph": super::wasi::nn::graph,
                    "wasi:nn/inference": super::wasi::nn::inference,
                    "wasi:nn/errors": super::wasi::nn::errors,
                },
            });
        }
    };
}

role_world!(transformer, "weft:plugin/transformer");
role_world!(combiner, "weft:plugin/combiner");
role_world!(router, "weft:plugin/router");
