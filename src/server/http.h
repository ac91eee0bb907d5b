// The HTTP/1.1 layer of cpinfer serve: one thread per connection, requests parsed by Boost.Beast's
// parser under explicit limits, responses written with deadlines. It replaces cpp-httplib 0.11,
// which could not refuse a request with a million header lines before buffering them, answered only
// the first of pipelined requests and accepted `Content-Length: -1` (tests/server/http_test.cpp).
//
// Refusals (the connection is closed after each): request line too long 414, headers too large or
// too many 431, body too large 413, malformed request or Content-Length 400, a transfer coding
// other than chunked or an unknown method 501, a request not complete within the read timeout 408,
// too many open connections 503.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cpinfer::server {

struct HttpLimits {
  size_t max_request_line_bytes = 8 << 10;   // 414
  size_t max_header_bytes = 32 << 10;        // request line + headers, 431
  size_t max_header_count = 128;             // 431
  size_t max_body_bytes = size_t(64) << 20;  // 413 (after chunked decoding)
  // A request's line, headers and body must all arrive within read_timeout of its first byte
  // (slow senders cannot hold a thread forever); a kept-alive connection with no request for
  // idle_timeout is closed; a client that takes no bytes for write_timeout is dropped.
  std::chrono::milliseconds read_timeout{std::chrono::seconds(30)};
  std::chrono::milliseconds idle_timeout{std::chrono::seconds(60)};
  std::chrono::milliseconds write_timeout{std::chrono::seconds(30)};
  int max_connections = 512;  // open connections; more are answered 503 and closed
};

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method;  // "GET", "POST", "HEAD" (answered as GET without a body)
  std::string target;  // as sent, e.g. "/v1/models?x=1"
  std::string path;    // target up to '?'
  HttpHeaders headers;
  std::string body;
  // The value of header `name` (case-insensitive); "" when absent.
  std::string header(std::string_view name) const;
};

// The answer to one request: send() once, or begin_stream(), write()..., end_stream(). A handler
// that returns having sent nothing closes the connection. Not thread-safe: one handler thread.
class HttpResponder {
 public:
  virtual ~HttpResponder() = default;
  virtual void send(int status, std::string_view content_type, std::string_view body,
                    const HttpHeaders& extra = {}) = 0;
  // Chunked transfer (HTTP/1.1) or a body ended by closing the connection (HTTP/1.0). Returns false
  // when the client is gone; then so does every later write().
  virtual bool begin_stream(int status, std::string_view content_type, const HttpHeaders& extra = {}) = 0;
  virtual bool write(std::string_view data) = 0;
  virtual void end_stream() = 0;
  // True when the client has closed its side or the connection failed (pipelined bytes waiting to
  // be read do not count). Does not block.
  virtual bool peer_closed() = 0;
};

using HttpHandler = std::function<void(const HttpRequest&, HttpResponder&)>;
// The body of a refusal the HTTP layer makes itself (status, message) -> JSON text.
using HttpErrorBody = std::function<std::string(int status, const std::string& message)>;

class HttpServer {
 public:
  HttpServer(HttpLimits limits, HttpHandler handler, HttpErrorBody error_body);
  ~HttpServer();  // stop() and wait for the connections
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens; port 0 picks a free port. Returns the port. Throws cpinfer::Error.
  int bind(const std::string& host, int port);
  // Accepts connections until stop(). Call once, on its own thread.
  void serve();
  // Stops accepting; idle connections close, busy ones close after their current response.
  // Waits up to `wait` for every connection to end.
  void stop(std::chrono::milliseconds wait = std::chrono::seconds(10));
  int n_connections() const;

  struct State;  // shared with the connection threads

 private:
  std::shared_ptr<State> st_;
  int listen_fd_ = -1;
};

}  // namespace cpinfer::server
