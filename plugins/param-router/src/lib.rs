//! `param-router`: a router that picks the branch named by a request parameter.
//!
//! Params: `key` (default `route`) names the request parameter to read; the graph passes request
//! parameters to plugins as `request.<name>`. `default` is the branch when the request does not
//! say; without it, a request that does not say is an `invalid-input` error.

use weft_sdk::{Error, NamedTensor, Params, Router, param};

struct ParamRouter;

impl Router for ParamRouter {
    fn route(_inputs: Vec<NamedTensor>, params: Params) -> Result<String, Error> {
        let key = param(&params, "key").unwrap_or("route");
        let chosen =
            param(&params, &format!("request.{key}")).or_else(|| param(&params, "default"));
        chosen.map(str::to_string).ok_or_else(|| {
            Error::InvalidInput(format!(
                "param-router: the request has no parameter '{key}' and no default is set"
            ))
        })
    }
}

weft_sdk::export_router!(ParamRouter);
