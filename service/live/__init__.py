"""Live audio (TranscribeLive): frames per source → bounded queue → ring buffer + streaming VAD
endpointing → the shared engine (finals on each endpoint, partials by re-decoding the open
utterance) → events, with the finals stored in the session's job.

- `frames`: the session's config and each frame checked and decoded to float32.
- `source`: one source's bounded queue (service/chunk_queue.py, drop-oldest/reject/block), its
  ring buffer of recent audio, its status (ok / backpressure / dropping / dropped).
- `endpoint`: silero-vad on the stream (service/segment.py's scorer), utterances out.
- `session`: a session's sources, the pump that moves frames through VAD, and the decodes.
- `runtime`: what a server holds: the engine, the worker pools, open and detached sessions.
- `rpc`: the asyncio gRPC handler over all of that.
"""
