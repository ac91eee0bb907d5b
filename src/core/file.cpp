#include "core/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/check.h"

namespace cpinfer {

namespace {
const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace

RegularFile::RegularFile(const std::string& path) {
  // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  CPI_CHECK(fd_ >= 0, "cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    const mode_t mode = st.st_mode;
    ::close(fd_);
    fd_ = -1;
    CPI_FAIL(path, " is ", kind_of(mode), ", not a regular file; refusing to read it");
  }
  // Regular files ignore O_NONBLOCK, but clear it so reads behave as documented everywhere.
  int flags = ::fcntl(fd_, F_GETFL);
  if (flags >= 0) ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK);
  size_ = static_cast<uint64_t>(st.st_size);
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

std::string read_regular_file(const std::string& path, uint64_t max_bytes) {
  RegularFile f(path);
  CPI_CHECK(f.size() <= max_bytes, path, " is ", f.size(), " bytes, more than the ", max_bytes,
            "-byte limit for this kind of file");
  std::string out(static_cast<size_t>(f.size()), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(f.fd(), out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    CPI_CHECK(n >= 0, "cannot read ", path, ": ", std::strerror(errno));
    if (n == 0) break;  // the file shrank while we read it
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

}  // namespace cpinfer
