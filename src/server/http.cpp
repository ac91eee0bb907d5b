#include "server/http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/beast/core/error.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/string_body.hpp>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "core/check.h"
#include "core/log.h"

namespace cpinfer::server {

namespace http = boost::beast::http;
using Clock = std::chrono::steady_clock;

namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

int ms_until(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

std::string_view trim(boost::beast::string_view v) {
  std::string_view s(v.data(), v.size());
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// True when the header block at the start of `raw` has a field named `name` (lower case).
bool has_field(const std::string& raw, std::string_view name) {
  std::string head = raw.substr(0, raw.find("\r\n\r\n"));
  for (char& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return head.find("\n" + std::string(name) + ":") != std::string::npos;
}

std::string reason_of(int status) {
  if (status == 499) return "Client Closed Request";
  auto r = http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  return r.empty() ? "Unknown" : std::string(r);
}

}  // namespace

std::string HttpRequest::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (iequals(k, name)) return v;
  return {};
}

struct HttpServer::State {
  HttpLimits limits;
  HttpHandler handler;
  HttpErrorBody error_body;
  std::atomic<bool> stopping{false};
  int wake_pipe[2] = {-1, -1};  // written once by stop(): every poll() below wakes
  std::mutex mu;
  std::condition_variable cv;
  int n_conn = 0;  // guarded by mu
  ~State() {
    for (int fd : wake_pipe)
      if (fd >= 0) ::close(fd);
  }
};

namespace {

using State = HttpServer::State;

enum class Wait { Ready, Timeout, Stop, Error };

// Waits until fd is readable (or writable), the deadline passes, or the server stops.
Wait wait_fd(const State& st, int fd, short events, Clock::time_point deadline, bool stop_wakes) {
  for (;;) {
    pollfd p[2] = {{fd, events, 0}, {st.wake_pipe[0], POLLIN, 0}};
    int n = ::poll(p, stop_wakes ? 2 : 1, ms_until(deadline));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Wait::Error;
    if (n == 0) return Wait::Timeout;
    if (stop_wakes && (p[1].revents & POLLIN)) return Wait::Stop;
    if (p[0].revents & (events | POLLHUP | POLLERR)) return Wait::Ready;
    if (p[0].revents & POLLNVAL) return Wait::Error;
  }
}

class Connection final : public HttpResponder {
 public:
  Connection(std::shared_ptr<State> st, int fd) : st_(std::move(st)), fd_(fd) {}
  ~Connection() override { ::close(fd_); }

  void run();

  void send(int status, std::string_view content_type, std::string_view body, const HttpHeaders& extra) override {
    if (responded_) return;
    responded_ = true;
    std::string out = head(status, content_type, extra);
    out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
    if (!head_only_) out.append(body);
    ok_ = send_all(out);
  }
  bool begin_stream(int status, std::string_view content_type, const HttpHeaders& extra) override {
    if (responded_) return ok_;
    responded_ = true;
    streaming_ = true;
    chunked_ = http11_;
    if (!chunked_) keep_alive_ = false;  // HTTP/1.0: the body ends when the connection does
    std::string out = head(status, content_type, extra);
    if (chunked_) out += "Transfer-Encoding: chunked\r\n";
    out += "\r\n";
    ok_ = send_all(out);
    return ok_;
  }
  bool write(std::string_view data) override {
    if (!ok_ || !streaming_ || data.empty() || head_only_) return ok_;
    if (!chunked_) return ok_ = send_all(data);
    char size[24];
    std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
    std::string out = size;
    out.append(data);
    out += "\r\n";
    return ok_ = send_all(out);
  }
  void end_stream() override {
    if (ok_ && streaming_ && chunked_ && !head_only_) ok_ = send_all("0\r\n\r\n");
    streaming_ = false;
  }
  bool peer_closed() override {
    if (!ok_) return true;
    pollfd p{fd_, POLLIN | POLLRDHUP, 0};
    if (::poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
    if (p.revents & POLLIN) {
      char c;
      return ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
    }
    return false;
  }

  // A refusal by the HTTP layer itself; the connection closes after it.
  void refuse(int status, const std::string& message) {
    keep_alive_ = false;
    send(status, "application/json", st_->error_body(status, message), {});
  }

 private:
  std::string head(int status, std::string_view content_type, const HttpHeaders& extra) {
    if (st_->stopping.load()) keep_alive_ = false;
    std::string out = (http11_ ? "HTTP/1.1 " : "HTTP/1.0 ") + std::to_string(status) + " " + reason_of(status) + "\r\n";
    if (!content_type.empty()) out += "Content-Type: " + std::string(content_type) + "\r\n";
    for (const auto& [k, v] : extra) out += k + ": " + v + "\r\n";
    out += keep_alive_ ? (http11_ ? "" : "Connection: keep-alive\r\n") : "Connection: close\r\n";
    return out;
  }
  bool send_all(std::string_view data) {
    const auto deadline = Clock::now() + st_->limits.write_timeout;
    while (!data.empty()) {
      ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        data.remove_prefix(static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (wait_fd(*st_, fd_, POLLOUT, deadline, /*stop_wakes=*/false) == Wait::Ready) continue;
      }
      keep_alive_ = false;
      return false;
    }
    return true;
  }
  // Reads more bytes into in_. Returns false on EOF, error, timeout or stop (`why` says which).
  bool fill(Clock::time_point deadline, bool stop_wakes, Wait* why, bool* eof) {
    Wait w = wait_fd(*st_, fd_, POLLIN, deadline, stop_wakes);
    *why = w;
    if (w != Wait::Ready) return false;
    char buf[16384];
    for (;;) {
      ssize_t n = ::recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0) {
        in_.append(buf, static_cast<size_t>(n));
        return true;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;  // spurious wake-up
      *eof = n == 0;
      *why = Wait::Error;
      return false;
    }
  }
  bool read_request(HttpRequest& req);

  std::shared_ptr<State> st_;
  int fd_;
  std::string in_;  // received, not yet parsed (a pipelined request may wait here)
  bool http11_ = true, keep_alive_ = true, head_only_ = false;
  bool responded_ = false, streaming_ = false, chunked_ = false, ok_ = true;
};

// Parses one request from in_ (reading more as needed). False: nothing more to do on this
// connection (a refusal was sent where one was due).
bool Connection::read_request(HttpRequest& req) {
  const HttpLimits& lim = st_->limits;
  http11_ = true;
  keep_alive_ = true;
  head_only_ = false;
  responded_ = streaming_ = chunked_ = false;
  // Between requests: wait for the first byte up to the idle timeout (or until the server stops).
  while (in_.empty()) {
    Wait why;
    bool eof = false;
    if (!fill(Clock::now() + lim.idle_timeout, /*stop_wakes=*/true, &why, &eof)) return false;
  }
  const auto deadline = Clock::now() + lim.read_timeout;
  http::request_parser<http::string_body> parser;
  parser.header_limit(static_cast<std::uint32_t>(lim.max_header_bytes));
  parser.body_limit(static_cast<std::uint64_t>(lim.max_body_bytes));
  parser.eager(false);  // stop after the header: it is checked before any body byte is taken
  bool checked_header = false;
  for (;;) {
    if (!parser.is_header_done()) {
      // The request line must end within its limit; Beast has only the total header limit.
      size_t eol = in_.find('\n');
      if ((eol == std::string::npos ? in_.size() : eol) > lim.max_request_line_bytes) {
        refuse(414, "the request line exceeds " + std::to_string(lim.max_request_line_bytes) + " bytes");
        return false;
      }
    }
    boost::beast::error_code ec;
    size_t used = in_.empty() ? 0 : parser.put(boost::asio::buffer(in_.data(), in_.size()), ec);
    if (ec && ec != http::error::need_more) {  // in_ still holds the refused header here
      if (ec == http::error::header_limit)
        refuse(431, "the request headers exceed " + std::to_string(lim.max_header_bytes) + " bytes");
      else if (ec == http::error::body_limit)
        refuse(413, "the request body exceeds " + std::to_string(lim.max_body_bytes) + " bytes");
      else if (ec == http::error::bad_transfer_encoding && has_field(in_, "content-length"))
        refuse(400, "both Transfer-Encoding and Content-Length");  // RFC 9112 6.1: smuggling
      else if (ec == http::error::bad_transfer_encoding)
        refuse(501, "unsupported Transfer-Encoding (only chunked is implemented)");
      else if (ec == http::error::bad_content_length)
        refuse(400, "invalid Content-Length");
      else
        refuse(400, "malformed HTTP request (" + ec.message() + ")");
      return false;
    }
    in_.erase(0, used);
    if (parser.is_header_done() && !checked_header) {
      checked_header = true;
      const auto& h = parser.get();
      const size_t n_fields = static_cast<size_t>(std::distance(h.begin(), h.end()));
      http11_ = h.version() >= 11;
      if (n_fields > lim.max_header_count) {
        refuse(431, "the request has " + std::to_string(n_fields) + " header fields; at most " +
                        std::to_string(lim.max_header_count) + " are accepted");
        return false;
      }
      const std::string_view method(h.method_string().data(), h.method_string().size());
      if (method != "GET" && method != "POST" && method != "HEAD") {
        refuse(501, "method " + std::string(method) + " is not implemented");
        return false;
      }
      if (h.version() != 10 && h.version() != 11) {
        refuse(505, "HTTP version not supported");
        return false;
      }
      auto te = h.find(http::field::transfer_encoding);
      if (te != h.end() && !iequals(trim(te->value()), "chunked")) {
        refuse(501, "unsupported Transfer-Encoding '" + std::string(te->value()) + "' (only chunked is implemented)");
        return false;
      }
      auto expect = h.find(http::field::expect);
      if (expect != h.end()) {
        if (!iequals(std::string_view(expect->value().data(), expect->value().size()), "100-continue")) {
          refuse(417, "unsupported Expect");
          return false;
        }
        if (!parser.is_done() && !send_all(std::string(http11_ ? "HTTP/1.1" : "HTTP/1.0") + " 100 Continue\r\n\r\n"))
          return false;
      }
      parser.eager(true);
      continue;  // body bytes may already be in in_
    }
    if (parser.is_done()) break;
    Wait why;
    bool eof = false;
    if (!fill(deadline, /*stop_wakes=*/false, &why, &eof)) {
      if (why == Wait::Timeout) refuse(408, "the request did not arrive within the read timeout");
      return false;  // EOF or error mid-request: nobody to answer
    }
  }
  const auto& m = parser.get();
  req.method.assign(m.method_string().data(), m.method_string().size());
  req.target.assign(m.target().data(), m.target().size());
  req.path = req.target.substr(0, req.target.find('?'));
  req.headers.clear();
  for (const auto& f : m) req.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
  req.body = std::move(parser.get().body());
  keep_alive_ = m.keep_alive() && !st_->stopping.load();
  head_only_ = req.method == "HEAD";
  if (head_only_) req.method = "GET";
  return true;
}

void Connection::run() {
  HttpRequest req;
  while (!st_->stopping.load() && read_request(req)) {
    try {
      st_->handler(req, *this);
    } catch (const std::exception& e) {
      log_warn("HTTP handler failed: ", e.what());
      if (!responded_) refuse(500, std::string("internal error: ") + e.what());
    }
    if (streaming_) end_stream();
    if (!responded_ || !ok_ || !keep_alive_) break;
  }
  ::shutdown(fd_, SHUT_WR);
  // Lingering close: closing with unread input makes the kernel send RST, and a client still
  // sending (a refused million-line header) would lose our answer before reading it. Read and drop
  // (memory stays constant) until the client closes, for at most 2 s.
  const auto end = Clock::now() + std::chrono::seconds(2);
  char buf[16384];
  for (;;) {
    if (wait_fd(*st_, fd_, POLLIN, end, /*stop_wakes=*/true) != Wait::Ready) break;
    ssize_t n = ::recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) break;
  }
}

}  // namespace

HttpServer::HttpServer(HttpLimits limits, HttpHandler handler, HttpErrorBody error_body)
    : st_(std::make_shared<State>()) {
  st_->limits = limits;
  st_->handler = std::move(handler);
  st_->error_body = std::move(error_body);
  CPI_CHECK(::pipe2(st_->wake_pipe, O_CLOEXEC | O_NONBLOCK) == 0, "pipe2: ", std::strerror(errno));
}

HttpServer::~HttpServer() {
  stop();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  // The wake pipe closes with the last owner of State (a connection thread may outlive us).
}

int HttpServer::bind(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  CPI_CHECK(rc == 0, "cannot resolve --host ", host, ": ", ::gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = res; a && listen_fd_ < 0; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
      listen_fd_ = fd;
    } else {
      why = std::strerror(errno);
      ::close(fd);
    }
  }
  ::freeaddrinfo(res);
  CPI_CHECK(listen_fd_ >= 0, "cannot listen on ", host, ":", port, ": ", why, " (in use? pick another --port)");
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len);
  return ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                  : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

void HttpServer::serve() {
  CPI_CHECK(listen_fd_ >= 0, "HttpServer::serve before bind");
  std::shared_ptr<State> st = st_;
  while (!st->stopping.load()) {
    if (wait_fd(*st, listen_fd_, POLLIN, Clock::now() + std::chrono::hours(24), true) != Wait::Ready) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_unique<Connection>(st, fd);
    {
      std::lock_guard lk(st->mu);
      if (st->n_conn >= st->limits.max_connections) {
        conn->refuse(503, "too many open connections (" + std::to_string(st->n_conn) + ")");
        continue;
      }
      ++st->n_conn;
    }
    std::thread([st, c = std::move(conn)]() mutable {
      c->run();
      c.reset();
      std::lock_guard lk(st->mu);
      if (--st->n_conn == 0) st->cv.notify_all();
    }).detach();
  }
}

void HttpServer::stop(std::chrono::milliseconds wait) {
  if (!st_->stopping.exchange(true)) {
    char c = 1;
    [[maybe_unused]] ssize_t n = ::write(st_->wake_pipe[1], &c, 1);
  }
  std::unique_lock lk(st_->mu);
  st_->cv.wait_for(lk, wait, [&] { return st_->n_conn == 0; });
}

int HttpServer::n_connections() const {
  std::lock_guard lk(st_->mu);
  return st_->n_conn;
}

}  // namespace cpinfer::server
