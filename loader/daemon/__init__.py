"""The daemon: wiring (source, memory file, queue, loader, server, page-fault handler),
its options and start-up checks, working sets, progress, signals; systemd notification
and socket activation; the Prometheus endpoint."""
