"""misbehave: a Python test plugin that does what its ``mode`` param says, to show Python
plugins meet the same limits and error paths as Rust ones.

Modes: ``echo`` (default) returns its inputs; ``raise`` raises a ValueError; ``invalid``
raises InvalidInput; ``loop`` never returns; ``allocate`` grows a list without end; ``model``
calls the model named by ``model`` through wasi:nn with the input ``x``; ``log`` logs a line.
"""

from weft_plugin import InvalidInput, infer, log, transformer


@transformer
def misbehave(inputs, params):
    mode = params.get("mode", "echo")
    if mode == "raise":
        raise ValueError("the misbehave plugin was told to fail")
    if mode == "invalid":
        raise InvalidInput("misbehave: this input is not acceptable")
    if mode == "loop":
        n = 0
        while True:
            n += 1
    if mode == "allocate":
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
    if mode == "model":
        return infer(params["model"], {"x": inputs["x"]})
    if mode == "log":
        log.info(f"misbehave saw {len(inputs)} inputs")
    return inputs
