"""MLServer 1.7.1 runtime for the graph3 work (see graph3.py)."""

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from graph3 import Graph3


class Graph3Runtime(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        self.graph = Graph3(self.settings.parameters.uri, extra["graph"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.graph(x)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name="y", payload=y)],
        )
