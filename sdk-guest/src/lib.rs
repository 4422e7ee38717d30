//! `weft-sdk`: what a Weft plugin author depends on.
//!
//! A plugin is a WebAssembly component that plays one role in an inference graph — a
//! [`Transformer`] (pre- or post-processing), a [`Combiner`] (merging parallel branches) or a
//! [`Router`] (choosing a branch). This crate wraps the `weft:plugin` WIT bindings with typed
//! tensor views, a one-line model call through `wasi:nn`, and one export macro per role.
//!
//! A complete transformer that scales every FP32 input by the node's `factor` parameter:
//!
//! ```ignore
//! use weft_sdk::{Error, NamedTensor, Params, Tensor, Transformer, param_f32};
//!
//! struct Scale;
//!
//! impl Transformer for Scale {
//!     fn transform(inputs: Vec<NamedTensor>, params: Params) -> Result<Vec<NamedTensor>, Error> {
//!         let factor = param_f32(&params, "factor")?.unwrap_or(1.0);
//!         inputs
//!             .into_iter()
//!             .map(|input| {
//!                 let values: Vec<f32> = input.tensor.to_f32()?.iter().map(|v| v * factor).collect();
//!                 let tensor = Tensor::from_f32(&input.tensor.shape(), &values)?;
//!                 Ok(NamedTensor { name: input.name, tensor })
//!             })
//!             .collect()
//!     }
//! }
//!
//! weft_sdk::export_transformer!(Scale);
//! ```
//! Build it with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the plugin.

#![allow(clippy::missing_safety_doc)]

/// Raw bindings of the shared import world (tensors, log, `wasi:nn`).
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "weft:plugin/imports",
        generate_all,
    });
}

/// Generates one role world's bindings and its export macro, sharing the imports above.
macro_rules! role_world {
    ($(#[$doc:meta])* $module:ident, $world:literal, $export:literal, $path:literal) => {
        $(#[$doc])*
        pub mod $module {
            wit_bindgen::generate!({
                path: "../wit",
                world: $world,
                with: {
                    "weft:plugin/types@0.1.0": crate::bindings::weft::plugin::types,
                    "weft:plugin/host@0.1.0": crate::bindings::weft::plugin::host,
                    "wasi:nn/tensor@0.2.0-rc-2024-10-28": crate::bindings::wasi::nn::tensor,
                    "wasi:nn/errors@0.2.0-rc-2024-10-28": crate::bindings::wasi::nn::errors,
                    "wasi:nn/inference@0.2.0-rc-2024-10-28": crate::bindings::wasi::nn::inference,
                    "wasi:nn/graph@0.2.0-rc-2024-10-28": crate::bindings::wasi::nn::graph,
                },
                pub_export_macro: true,
                export_macro_name: $export,
                default_bindings_module: $path,
            });
        }
    };
}

role_world!(
    /// Bindings of the `transformer` world; see [`Transformer`] and [`export_transformer!`].
    transformer, "weft:plugin/transformer", "export_transformer", "weft_sdk::transformer"
);
role_world!(
    /// Bindings of the `combiner` world; see [`Combiner`] and [`export_combiner!`].
    combiner, "weft:plugin/combiner", "export_combiner", "weft_sdk::combiner"
);
role_world!(
    /// Bindings of the `router` world; see [`Router`] and [`export_router!`].
    router, "weft:plugin/router", "export_router", "weft_sdk::router"
);

mod tensor;

pub use bindings::weft::plugin::host::{Level, log};
pub use bindings::weft::plugin::types::{Branch, Datatype, Error, NamedTensor, Params, Tensor};
pub use combiner::export_combiner;
pub use router::export_router;
pub use tensor::{Target, infer, infer_on, param, param_f32, param_usize};
pub use transformer::export_transformer;

/// A transformer: rewrites the tensors flowing through its node.
///
/// ```ignore
/// struct Identity;
/// impl weft_sdk::Transformer for Identity {
///     fn transform(inputs: Vec<weft_sdk::NamedTensor>, _: weft_sdk::Params)
///         -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> { Ok(inputs) }
/// }
/// weft_sdk::export_transformer!(Identity);
/// ```
pub use transformer::Guest as Transformer;

/// A combiner: merges the outputs of its node's children, which ran in parallel.
///
/// ```ignore
/// struct First;
/// impl weft_sdk::Combiner for First {
///     fn combine(branches: Vec<weft_sdk::Branch>, _: weft_sdk::Params)
///         -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
///         branches.into_iter().next().map(|b| b.outputs)
///             .ok_or_else(|| weft_sdk::Error::InvalidInput("no branches".into()))
///     }
/// }
/// weft_sdk::export_combiner!(First);
/// ```
pub use combiner::Guest as Combiner;

/// A router: names the child of its node that handles the request.
///
/// ```ignore
/// struct Always;
/// impl weft_sdk::Router for Always {
///     fn route(_: Vec<weft_sdk::NamedTensor>, _: weft_sdk::Params) -> Result<String, weft_sdk::Error> {
///         Ok("default".into())
///     }
/// }
/// weft_sdk::export_router!(Always);
/// ```
pub use router::Guest as Router;
