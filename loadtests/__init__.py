"""Cascade load tests: locust users that are real WebRTC participants."""
