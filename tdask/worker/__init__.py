"""tdask on a worker: the plugin that installs it, the request streams it serves, replicas, kept outputs, lanes."""
