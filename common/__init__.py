"""Small sans-I/O pieces several layers share."""
