"""Cascade directory: signed, expiring node and room records on a Kademlia DHT."""
