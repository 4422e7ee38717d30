"""param-router: a router that picks the branch named by a request parameter, the Python twin
of plugins/param-router.

Params: ``key`` (default ``route``) names the request parameter to read; the graph passes
request parameters to plugins as ``request.<name>``. ``default`` is the branch when the request
does not say; without it, a request that does not say is an ``invalid-input`` error.
"""

from weft_plugin import InvalidInput, router


@router
def param_router(inputs, params):
    key = params.get("key", "route")
    chosen = params.get(f"request.{key}", params.get("default"))
    if chosen is None:
        raise InvalidInput(
            f"param-router: the request has no parameter '{key}' and no default is set"
        )
    return chosen
