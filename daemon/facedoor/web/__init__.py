"""`facedoor web`: the operator's console, a small web application in its own process.

It shares the door's embedding store (SQLite WAL: the running door sees every change through its
StoreWatcher within a second) and its audit data (the JSONL log and face crops, indexed into a
console-owned SQLite file for paging), and never takes part in a decision: a console that is
stopped or crashes changes nothing at the door. Modules: `users` (argon2id password file and
roles), `guard` (CSRF, login rate limit, request size), `visits` (the audit index), `door`
(the door's status), `actions` (enrol, remove, label, retention), `app` (the Starlette routes).
"""
