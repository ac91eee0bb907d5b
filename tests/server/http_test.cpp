// The HTTP layer (server/http.h) driven over raw sockets with the requests a hostile or broken client
// sends (issue 14): pipelining, a million header lines, invalid Content-Length, over-long request
// lines, bodies and header sets, unsupported codings and methods, slow senders, idle connections.
#include "server/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

namespace cpinfer::server {
namespace {

using namespace std::chrono_literals;

// A server on a free port whose handler echoes method, path and body; "/stream" answers three
// chunks; "/slow" waits 300 ms first.
class TestServer {
 public:
  explicit TestServer(HttpLimits limits = {}) {
    server_ = std::make_unique<HttpServer>(
        limits,
        [](const HttpRequest& req, HttpResponder& res) {
          if (req.path == "/stream") {
            res.begin_stream(200, "text/plain");
            for (const char* part : {"one ", "two ", "three"}) res.write(part);
            res.end_stream();
            return;
          }
          if (req.path == "/slow") std::this_thread::sleep_for(300ms);
          res.send(200, "text/plain", req.method + " " + req.target + " [" + req.body + "]", {{"X-Test", "yes"}});
        },
        [](int status, const std::string& msg) {
          return "{\"status\":" + std::to_string(status) + ",\"m\":\"" + msg + "\"}";
        });
    port_ = server_->bind("127.0.0.1", 0);
    thread_ = std::thread([this] { server_->serve(); });
  }
  ~TestServer() {
    server_->stop(2s);
    thread_.join();
  }
  int port() const { return port_; }
  HttpServer& server() { return *server_; }

 private:
  std::unique_ptr<HttpServer> server_;
  int port_ = 0;
  std::thread thread_;
};

int connect_to(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

// Sends all of `data`; false when the server closed the connection first.
bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Everything the server sends until it closes the connection (or `timeout` passes).
std::string read_until_close(int fd, std::chrono::milliseconds timeout = 5000ms) {
  std::string out;
  const auto end = std::chrono::steady_clock::now() + timeout;
  char buf[65536];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now()).count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) break;
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

bool closed_by_server(int fd, std::chrono::milliseconds timeout = 5000ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
  char c;
  return ::recv(fd, &c, 1, 0) <= 0;
}

// One exchange on a fresh connection: the whole reply up to the server's close.
std::string exchange(int port, const std::string& request, std::chrono::milliseconds timeout = 5000ms) {
  int fd = connect_to(port);
  send_all(fd, request);
  std::string reply = read_until_close(fd, timeout);
  ::close(fd);
  return reply;
}

int status_of(const std::string& reply) {
  if (reply.rfind("HTTP/1.", 0) != 0 || reply.size() < 12) return -1;
  return std::stoi(reply.substr(9, 3));
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

long rss_kb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

TEST(Http, PipelinedRequestsAreAllAnsweredInOrder) {
  TestServer s;
  std::string reqs =
      "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
      "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
      "GET /c?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  std::string reply = exchange(s.port(), reqs);
  EXPECT_EQ(count(reply, "HTTP/1.1 200 OK"), 3u) << reply;
  size_t a = reply.find("GET /slow []"), b = reply.find("POST /b [hello]"), c = reply.find("GET /c?q=1 []");
  ASSERT_NE(a, std::string::npos) << reply;
  ASSERT_NE(b, std::string::npos) << reply;
  ASSERT_NE(c, std::string::npos) << reply;
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
  EXPECT_NE(reply.find("Connection: close"), std::string::npos);  // the last asked for it
}

TEST(Http, KeepAliveServesSeveralRequestsOnOneConnection) {
  TestServer s;
  int fd = connect_to(s.port());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(send_all(fd, "GET /k" + std::to_string(i) + " HTTP/1.1\r\nHost: x\r\n\r\n"));
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0);
    EXPECT_NE(std::string(buf, static_cast<size_t>(n)).find("GET /k" + std::to_string(i) + " []"), std::string::npos);
  }
  ::close(fd);
}

TEST(Http, AMillionHeaderLinesAreRefusedEarlyWithoutGrowingTheServer) {
  TestServer s;
  const long before = rss_kb();
  std::string block;
  for (int i = 0; i < 10000; ++i) block += "X-Filler-" + std::to_string(i) + ": y\r\n";
  for (int round = 0; round < 4; ++round) {
    int fd = connect_to(s.port());
    ASSERT_TRUE(send_all(fd, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + block));
    // The answer comes after the first 140 kB, before the other 99 blocks (1M lines, 14 MB) are sent.
    pollfd p{fd, POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 5000), 1) << "no early answer";
    char buf[512];
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0);
    EXPECT_EQ(status_of(std::string(buf, static_cast<size_t>(n))), 431);
    for (int i = 0; i < 99 && send_all(fd, block); ++i) {
    }
    ::close(fd);
  }
  // The server lives in this process: 4 x 14 MB of headers must not have stayed anywhere.
  EXPECT_LT(rss_kb() - before, 16 * 1024) << "RSS grew from " << before << " kB to " << rss_kb() << " kB";
}

TEST(Http, TooManyHeaderFieldsAre431) {
  HttpLimits lim;
  lim.max_header_count = 20;
  TestServer s(lim);
  std::string req = "GET / HTTP/1.1\r\nHost: x\r\n";
  for (int i = 0; i < 21; ++i) req += "A" + std::to_string(i) + ": b\r\n";
  EXPECT_EQ(status_of(exchange(s.port(), req + "\r\n")), 431);
  std::string ok = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n";
  for (int i = 0; i < 18; ++i) ok += "A" + std::to_string(i) + ": b\r\n";
  EXPECT_EQ(status_of(exchange(s.port(), ok + "\r\n")), 200);
}

TEST(Http, InvalidContentLengthIsRefused) {
  TestServer s;
  for (const char* cl : {"-1", "18446744073709551616", "18446744073709551615", "12abc", "abc", "+5", "5, 6", ""}) {
    SCOPED_TRACE(cl);
    std::string reply =
        exchange(s.port(), std::string("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: ") + cl + "\r\n\r\nhello");
    const int st = status_of(reply);
    EXPECT_TRUE(st == 400 || st == 413) << reply;  // 2^64-1 is a well-formed number beyond the body limit
    EXPECT_EQ(reply.find("[hello]"), std::string::npos) << reply;
  }
  // Two different lengths, and a length beside chunked coding (request smuggling).
  EXPECT_EQ(status_of(exchange(s.port(),
                               "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")),
            400);
  EXPECT_EQ(status_of(exchange(s.port(),
                               "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")),
            400);
}

TEST(Http, LongRequestLineIs414AndBigBodyIs413) {
  HttpLimits lim;
  lim.max_body_bytes = 1000;
  TestServer s(lim);
  EXPECT_EQ(status_of(exchange(s.port(), "GET /" + std::string(9000, 'a') + " HTTP/1.1\r\nHost: x\r\n\r\n")), 414);
  // Refused before the whole line arrives: the line never ends.
  EXPECT_EQ(status_of(exchange(s.port(), "GET /" + std::string(20000, 'a'))), 414);
  EXPECT_EQ(status_of(exchange(s.port(),
                               "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + std::string(1001, 'b'))),
            413);
  // Chunked bodies count after decoding.
  std::string chunked = "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  for (int i = 0; i < 3; ++i) chunked += "190\r\n" + std::string(400, 'c') + "\r\n";
  EXPECT_EQ(status_of(exchange(s.port(), chunked + "0\r\n\r\n")), 413);
  std::string small =
      "POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
      "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  std::string reply = exchange(s.port(), small);
  EXPECT_EQ(status_of(reply), 200);
  EXPECT_NE(reply.find("POST /x [abcde]"), std::string::npos) << reply;
}

TEST(Http, UnsupportedCodingsAndMethodsAre501MalformedIs400) {
  TestServer s;
  EXPECT_EQ(status_of(exchange(s.port(), "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nzz")), 501);
  EXPECT_EQ(status_of(exchange(s.port(), "BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")), 501);
  EXPECT_EQ(status_of(exchange(s.port(), "PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")), 501);
  EXPECT_EQ(status_of(exchange(s.port(), "GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n")), 400);
  EXPECT_EQ(status_of(exchange(s.port(), "this is not http\r\n\r\n")), 400);
  EXPECT_EQ(status_of(exchange(s.port(), "GET / HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n\r\n")), 417);
  // The refusal is the error body the server was given.
  std::string reply = exchange(s.port(), "BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(reply.find("{\"status\":501"), std::string::npos) << reply;
  EXPECT_NE(reply.find("Connection: close"), std::string::npos) << reply;
}

TEST(Http, SlowRequestIs408AndIdleConnectionsClose) {
  HttpLimits lim;
  lim.read_timeout = 300ms;
  lim.idle_timeout = 300ms;
  TestServer s(lim);
  int fd = connect_to(s.port());
  ASSERT_TRUE(send_all(fd, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"));  // 7 bytes short
  const auto t0 = std::chrono::steady_clock::now();
  std::string reply = read_until_close(fd, 5000ms);
  EXPECT_EQ(status_of(reply), 408) << reply;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  ::close(fd);
  int idle = connect_to(s.port());
  EXPECT_TRUE(closed_by_server(idle, 3000ms));
  ::close(idle);
}

TEST(Http, StreamingIsChunkedOnHttp11AndClosedOnHttp10) {
  TestServer s;
  std::string r11 = exchange(s.port(), "GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_NE(r11.find("Transfer-Encoding: chunked"), std::string::npos) << r11;
  EXPECT_NE(r11.find("4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"), std::string::npos) << r11;
  std::string r10 = exchange(s.port(), "GET /stream HTTP/1.0\r\n\r\n");
  EXPECT_EQ(r10.find("chunked"), std::string::npos) << r10;
  EXPECT_NE(r10.find("Connection: close"), std::string::npos) << r10;
  EXPECT_NE(r10.find("\r\n\r\none two three"), std::string::npos) << r10;
}

TEST(Http, ExpectContinueGetsAnInterimResponse) {
  TestServer s;
  int fd = connect_to(s.port());
  ASSERT_TRUE(send_all(fd,
                       "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
                       "Connection: close\r\n\r\n"));
  char buf[256];
  ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_TRUE(send_all(fd, "abc"));
  std::string reply = read_until_close(fd);
  EXPECT_NE(reply.find("POST /e [abc]"), std::string::npos) << reply;
  ::close(fd);
}

TEST(Http, ConnectionsBeyondTheLimitAre503) {
  HttpLimits lim;
  lim.max_connections = 2;
  TestServer s(lim);
  int a = connect_to(s.port()), b = connect_to(s.port());
  // Both are served (so both are counted) before the third arrives.
  for (int fd : {a, b}) {
    ASSERT_TRUE(send_all(fd, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    char buf[1024];
    ASSERT_GT(::recv(fd, buf, sizeof(buf), 0), 0);
  }
  EXPECT_EQ(s.server().n_connections(), 2);
  EXPECT_EQ(status_of(exchange(s.port(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 503);
  ::close(a);
  ::close(b);
}

TEST(Http, StopClosesIdleConnections) {
  auto s = std::make_unique<TestServer>();
  int fd = connect_to(s->port());
  ASSERT_TRUE(send_all(fd, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
  char buf[1024];
  ASSERT_GT(::recv(fd, buf, sizeof(buf), 0), 0);
  const auto t0 = std::chrono::steady_clock::now();
  s.reset();  // stop(): the kept-alive connection must not hold it for the idle timeout
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  EXPECT_TRUE(closed_by_server(fd, 1000ms));
  ::close(fd);
}

}  // namespace
}  // namespace cpinfer::server
