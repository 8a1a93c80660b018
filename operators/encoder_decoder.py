"""The hello-world pipeline operator: encoder, then decoder, with ``input_copies`` passed along."""

from __future__ import annotations

from tdask import Operator, Request


class EncoderDecoder(Operator):
    """Calls the ``encoder`` and ``decoder`` operators; large tensors move encoder to decoder directly."""

    inputs = ({"name": "input", "datatype": "INT64", "shape": [-1]},)
    outputs = ({"name": "output", "datatype": "INT64", "shape": [-1]},)

    async def setup(self) -> None:
        self.encoder = await self.context.operator("encoder")
        self.decoder = await self.context.operator("decoder")

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            encoded = self.encoder.infer(
                {"input": request.input("input")}, request.parameters,
                request_id=request.request_id, keep="auto",
            )
            # one element: shape [1] from tdask's encoder, [] (0-d) from the original example's
            input_copies = int((await encoded)["input_copies"].item())
            decoded = await self.decoder.infer(
                {"input": encoded.output("output")}, {"input_copies": input_copies},
                request_id=request.request_id,
            )
            await request.respond({"output": decoded["output"]})


class EncoderDecoderStream(Operator):
    """The streaming pipeline: ``encoder``, then the decoupled ``decoder_stream``; each chunk it answers is passed
    on as a response of its own (request parameter ``chunk_size``, elements per chunk)."""

    inputs = EncoderDecoder.inputs
    outputs = EncoderDecoder.outputs

    async def setup(self) -> None:
        self.encoder = await self.context.operator("encoder")
        self.decoder = await self.context.operator("decoder_stream")

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            encoded = self.encoder.infer(
                {"input": request.input("input")}, request.parameters,
                request_id=request.request_id, keep="auto",
            )
            parameters = {**request.parameters, "input_copies": int((await encoded)["input_copies"].item())}
            async with self.decoder.stream({"input": encoded.output("output")}, parameters,
                                           request_id=request.request_id) as chunks:
                async for chunk in chunks:
                    await request.send({"output": chunk["output"]})
            await request.end()
