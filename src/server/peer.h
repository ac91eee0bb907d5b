// Noticing that an HTTP client went away while its request is still generating, so that the
// request is cancelled and its KV blocks freed. cpp-httplib 0.11 does not hand the connection's
// socket to a handler, so the handler finds it once by its address pair among this process's
// sockets, then polls it.
#pragma once
#include <string>

namespace cpinfer::server {

// The connected TCP socket whose peer is remote_addr:remote_port and whose local port is
// local_port; -1 when none is found.
int find_connection_socket(const std::string& remote_addr, int remote_port, int local_port);

// True when the peer of fd has closed its side or the connection failed. fd < 0: false.
bool peer_closed(int fd);

}  // namespace cpinfer::server
