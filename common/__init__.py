"""Small sans-I/O pieces that several layers share (the engine, the relay, the node edge)."""
