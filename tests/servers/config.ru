# The Rack app Puma and unicorn serve in tests/servers.rs (same answer as wsgi.py).
server = File.basename($PROGRAM_NAME)
run lambda { |_env|
  body = "pid=#{Process.pid} generation=#{ENV['CLUSTER_GENERATION']} " \
         "worker=#{ENV['WORKER_ID']} server=#{server}\n"
  [200, { 'content-type' => 'text/plain', 'content-length' => body.bytesize.to_s }, [body]]
}
