"""The Unix-socket front end: the server and its sessions, and the clients of its protocol (docs/PROTOCOL.md)."""
