// The Node app in tests/servers.rs: serves the inherited socket (fd 3) with node's own
// http server; SIGTERM closes the listener and idle keep-alive connections, finishes
// in-flight requests and exits.
'use strict';
const http = require('http');
const server = http.createServer((req, res) => {
  const body = `pid=${process.pid} generation=${process.env.CLUSTER_GENERATION} ` +
    `worker=${process.env.WORKER_ID} server=node\n`;
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.listen({ fd: 3 }, () => console.log(`node ${process.version} pid ${process.pid} serving fd 3`));
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
