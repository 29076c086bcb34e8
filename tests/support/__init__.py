"""Helpers the tests share: real servers, task types, generated images."""
