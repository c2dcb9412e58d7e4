# unicorn's configuration in tests/servers.rs and the README's recipe. preload_app loads the
# app in the master before it forks, so a deploy that cannot load makes the master exit
# (without it the master stays up and respawns failing workers forever, which a reload
# cannot tell from success).
preload_app true
worker_processes Integer(ENV.fetch("UNICORN_WORKERS", "1"))
