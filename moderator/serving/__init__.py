"""The live service: engine, admission, reload, batching, servicer, server, metrics."""
