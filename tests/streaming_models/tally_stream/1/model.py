"""Sends ``count`` responses ``[i]``, ``seconds`` apart, appending one line per response sent to the file named by
the ``log`` parameter; stops when the request is cancelled (and writes ``cancelled``)."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            params = json.loads(request.parameters() or "{}")
            sender = request.get_response_sender()
            with open(params["log"], "a") as log:
                for i in range(int(params.get("count", 3))):
                    if sender.is_cancelled():
                        log.write("cancelled\n")
                        break
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("output", np.array([i], np.int64))]))
                    log.write(f"{i}\n")
                    log.flush()
                    time.sleep(float(params.get("seconds", 0)))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
