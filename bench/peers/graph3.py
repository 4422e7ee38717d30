"""The issue-20 "graph3" work for the peer servers: normalize -> ONNX model -> softmax.

The same three steps as Weft's `classify` / `wide3` graphs (plugins/normalize with its default
per-row z-score, the model, plugins/softmax over the last dimension), written the way a user of
each server would: NumPy for the two transforms and ONNX Runtime's Python package for the
model, with default session settings, all in one process.

    python graph3.py mlserver <repository> <port>   # MLServer 1.7.1 custom runtime
    python graph3.py kserve <repository> <port>     # KServe 0.21 custom model

Both serve models `classify` (mlp) and `wide3` (wide) over the Open Inference Protocol REST API
with JSON bodies; `weft bench --encoding json --input ...` drives them.
"""

import json
import os
import sys
import uuid

import numpy as np

GRAPHS = {"classify": ("mlp", 64, 10), "wide3": ("wide", 512, 512)}


def normalize(x):
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    std = np.where(std > np.finfo(np.float32).eps, std, 1.0)
    return ((x - mean) / std).astype(np.float32)


def softmax(y):
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class Graph3:
    def __init__(self, repository, name):
        import onnxruntime

        model, self.width, self.classes = GRAPHS[name]
        path = os.path.join(repository, "models", model, "1", "model.onnx")
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.width)
        (y,) = self.session.run(None, {self.input: normalize(x)})
        return softmax(y)


def mlserver(repository, port):
    """Writes an MLServer settings folder for both graphs and runs `mlserver start` on it."""
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="weft-peer-mlserver-")
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": 0,
                "metrics_port": port + 1,
                "parallel_workers": 0,
                "debug": False,
            },
            f,
        )
    for name, (model, width, classes) in GRAPHS.items():
        os.makedirs(os.path.join(folder, name))
        with open(os.path.join(folder, name, "model-settings.json"), "w") as f:
            json.dump(
                {
                    "name": name,
                    "implementation": "graph3_mlserver.Graph3Runtime",
                    "parameters": {"uri": repository, "extra": {"graph": name}},
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, classes]}],
                },
                f,
            )
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.execvpe(
        os.path.join(os.path.dirname(sys.executable), "mlserver"),
        ["mlserver", "start", folder],
        env,
    )


def kserve(repository, port):
    import kserve as ks

    class Graph3Model(ks.Model):
        def __init__(self, name):
            super().__init__(name)
            self.graph = None

        def load(self):
            self.graph = Graph3(repository, self.name)
            self.ready = True
            return True

        async def predict(self, payload, headers=None, response_headers=None):
            x = payload.inputs[0].as_numpy()
            y = self.graph(x)
            output = ks.InferOutput(name="y", shape=list(y.shape), datatype="FP32")
            output.set_data_from_numpy(y, binary_data=False)
            return ks.InferResponse(
                model_name=self.name,
                infer_outputs=[output],
                response_id=payload.id or str(uuid.uuid4()),
            )

    models = []
    for name in GRAPHS:
        model = Graph3Model(name)
        model.load()
        models.append(model)
    ks.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1).start(models)


if __name__ == "__main__":
    kind, repository, port = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
    {"mlserver": mlserver, "kserve": kserve}[kind](repository, port)
