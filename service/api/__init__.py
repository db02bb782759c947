"""The job API: submit, list, inspect, cancel, refresh, discover; and the request guard
(served hosts, cross-site requests, bearer tokens) that every route but the callbacks passes."""
