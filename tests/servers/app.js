// The Node app in tests/servers.rs: serves the inherited socket (fd 3) with node's own
// http server; SIGTERM closes the listener and idle keep-alive connections, answers what is
// in flight with `Connection: close` (a busy keep-alive connection would otherwise keep
// the old worker alive until the stop timeout) and exits.
'use strict';
const http = require('http');
let stopping = false;
const server = http.createServer((req, res) => {
  const body = `pid=${process.pid} generation=${process.env.CLUSTER_GENERATION} ` +
    `worker=${process.env.WORKER_ID} server=node\n`;
  const headers = { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) };
  if (stopping) headers.connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});
server.listen({ fd: 3 }, () => console.log(`node ${process.version} pid ${process.pid} serving fd 3`));
process.on('SIGTERM', () => {
  stopping = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
