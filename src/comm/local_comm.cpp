// The "local" back-end: ranks are threads sharing one address space, so a collective is a
// rendezvous where every rank publishes pointers to its buffers, waits for all peers, then reads
// what it needs straight from the peers' buffers.
//
// Each collective is a sequence of barriers. Passing a barrier other than the last one starts a
// read phase (the rank may now read peers' buffers); arriving at the next barrier ends it. Safety
// rules, all under one job-wide mutex:
//  - a rank starts reading only when every member arrived and the job has not failed;
//  - a rank that gives up (timeout, peer failure, bad arguments) first marks the job failed, so no
//    new read phase starts anywhere, then waits until no member of its group is still reading
//    (reads are plain memcpy/adds, so this wait is bounded) before it throws and frees buffers.
// Argument checks run after the first barrier on the data of all ranks, so every rank reaches the
// same verdict and all fail together with the same message.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "core/check.h"

namespace cpinfer {
namespace {

using Clock = std::chrono::steady_clock;

enum class Op : uint8_t { kAllGatherv, kAllReduceSum, kReduceScatterv, kAllToAllv, kBroadcast, kBarrier, kSplit };

const char* op_name(Op op) {
  switch (op) {
    case Op::kAllGatherv:
      return "all_gatherv";
    case Op::kAllReduceSum:
      return "all_reduce_sum";
    case Op::kReduceScatterv:
      return "reduce_scatterv_sum";
    case Op::kAllToAllv:
      return "all_to_allv";
    case Op::kBroadcast:
      return "broadcast";
    case Op::kBarrier:
      return "barrier";
    case Op::kSplit:
      return "split";
  }
  return "?";
}

struct Group;

// What one rank publishes for the collective it is in. Valid until that rank passes the
// collective's last barrier.
struct Slot {
  Op op = Op::kBarrier;
  const void* send = nullptr;
  void* recv = nullptr;             // all_reduce/broadcast: the in-place buffer
  size_t n = 0;                     // send_bytes, count or bytes
  std::span<const size_t> counts;   // recv_bytes (gatherv, alltoallv) or counts (reduce_scatterv)
  std::span<const size_t> counts2;  // send_bytes (alltoallv)
  DType dtype = DType::F32;
  int root = 0;
  int color = 0, key = 0;
  const float* scratch = nullptr;    // all_reduce: this rank's reduced chunk
  std::shared_ptr<Group> new_group;  // split: set by the new group's first member
};

// State shared by every communicator created by one run_local call (world and splits).
struct Job {
  std::mutex mu;
  std::condition_variable cv;
  bool failed = false;
  int failed_rank = -1;  // world rank of the first failure
  std::string failure;
  std::vector<char> exited;  // [world ranks] fn returned
  explicit Job(int n) : exited(static_cast<size_t>(n), 0) {}
};

struct Group {
  std::shared_ptr<Job> job;
  std::vector<int> world_ranks;   // [members] member -> world rank
  std::vector<uint64_t> arrived;  // [members] barriers entered so far
  std::vector<char> reading;      // [members] inside a read phase
  std::vector<Slot> slots;        // [members]
  Group(std::shared_ptr<Job> j, std::vector<int> ranks)
      : job(std::move(j)),
        world_ranks(std::move(ranks)),
        arrived(world_ranks.size(), 0),
        reading(world_ranks.size(), 0),
        slots(world_ranks.size()) {}
  int size() const { return static_cast<int>(world_ranks.size()); }
};

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + b_bytes && pb < pa + a_bytes;
}

bool sum_overflows(std::span<const size_t> v) {
  size_t total = 0;
  bool overflow = false;
  for (size_t x : v) overflow |= __builtin_add_overflow(total, x, &total);
  return overflow;
}

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<Group> group, int rank, std::chrono::milliseconds timeout)
      : g_(std::move(group)), rank_(rank) {
    timeout_ = timeout;
  }

  int rank() const override { return rank_; }
  int size() const override { return g_->size(); }
  std::string kind() const override { return "local"; }

  void all_gatherv(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes) override {
    Slot s;
    s.op = Op::kAllGatherv;
    s.send = send;
    s.recv = recv;
    s.n = send_bytes;
    s.counts = recv_bytes;
    enter(s);
    size_t off = 0;
    for (int j = 0; j < size(); ++j) {
      const Slot& p = g_->slots[j];
      auto* dst = static_cast<char*>(recv) + off;
      if (p.n > 0 && dst != p.send) std::memcpy(dst, p.send, p.n);
      off += p.n;
    }
    sync(Op::kAllGatherv, false);
  }

  void all_reduce_sum(void* buf, size_t count, DType dtype) override {
    const int n = size();
    // This rank reduces chunk rank_ of every buffer (ranks summed 0..n-1 in order, so the result
    // does not depend on who computes it), then every rank copies all chunks.
    const size_t begin = chunk_begin(count, rank_), end = chunk_begin(count, rank_ + 1);
    scratch_.assign(end - begin, 0.0f);
    Slot s;
    s.op = Op::kAllReduceSum;
    s.recv = buf;
    s.n = count;
    s.dtype = dtype;
    s.scratch = scratch_.data();
    enter(s);
    for (int j = 0; j < n; ++j) {
      const float* src = static_cast<const float*>(g_->slots[j].recv) + begin;
      if (j == 0) {
        std::copy(src, src + (end - begin), scratch_.begin());
      } else {
        for (size_t i = 0; i < end - begin; ++i) scratch_[i] += src[i];
      }
    }
    sync(Op::kAllReduceSum, true);
    for (int j = 0; j < n; ++j) {
      const size_t b = chunk_begin(count, j), e = chunk_begin(count, j + 1);
      if (e > b) std::memcpy(static_cast<float*>(buf) + b, g_->slots[j].scratch, (e - b) * sizeof(float));
    }
    sync(Op::kAllReduceSum, false);
  }

  void reduce_scatterv_sum(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    Slot s;
    s.op = Op::kReduceScatterv;
    s.send = send;
    s.recv = recv;
    s.counts = counts;
    s.dtype = dtype;
    // Reduce into scratch: recv may be written only once no peer reads this rank's send. Sized
    // before enter() so nothing in the read phase can throw.
    const size_t len = static_cast<size_t>(rank_) < counts.size() ? counts[rank_] : 0;
    scratch_.assign(len, 0.0f);
    enter(s);
    size_t begin = 0;
    for (int j = 0; j < rank_; ++j) begin += counts[j];
    for (int j = 0; j < size(); ++j) {
      const float* src = static_cast<const float*>(g_->slots[j].send) + begin;
      if (j == 0) {
        std::copy(src, src + len, scratch_.begin());
      } else {
        for (size_t i = 0; i < len; ++i) scratch_[i] += src[i];
      }
    }
    sync(Op::kReduceScatterv, false);
    if (len > 0) std::memcpy(recv, scratch_.data(), len * sizeof(float));
  }

  void all_to_allv(const void* send, std::span<const size_t> send_bytes, void* recv,
                   std::span<const size_t> recv_bytes) override {
    Slot s;
    s.op = Op::kAllToAllv;
    s.send = send;
    s.recv = recv;
    s.counts = recv_bytes;
    s.counts2 = send_bytes;
    enter(s);
    size_t roff = 0;
    for (int j = 0; j < size(); ++j) {
      const Slot& p = g_->slots[j];
      size_t soff = 0;
      for (int q = 0; q < rank_; ++q) soff += p.counts2[q];
      const size_t len = p.counts2[rank_];
      if (len > 0) std::memcpy(static_cast<char*>(recv) + roff, static_cast<const char*>(p.send) + soff, len);
      roff += recv_bytes[j];
    }
    sync(Op::kAllToAllv, false);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    Slot s;
    s.op = Op::kBroadcast;
    s.recv = buf;
    s.n = bytes;
    s.root = root;
    enter(s);
    const void* src = g_->slots[root].recv;
    if (rank_ != root && bytes > 0 && src != buf) std::memcpy(buf, src, bytes);
    sync(Op::kBroadcast, false);
  }

  void barrier() override {
    Slot s;
    s.op = Op::kBarrier;
    enter(s);  // the first barrier also checks that every rank called barrier()
    sync(Op::kBarrier, false);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    Slot s;
    s.op = Op::kSplit;
    s.color = color;
    s.key = key;
    std::vector<int> members;
    members.reserve(static_cast<size_t>(size()));
    enter(s);
    // Members of this color ordered by (key, old rank): identical on every member.
    for (int j = 0; j < size(); ++j)
      if (color >= 0 && g_->slots[j].color == color) members.push_back(j);
    std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return g_->slots[a].key < g_->slots[b].key; });
    const bool leader = !members.empty() && members[0] == rank_;
    if (leader) {
      try {
        std::vector<int> world;
        for (int m : members) world.push_back(g_->world_ranks[m]);
        g_->slots[rank_].new_group = std::make_shared<Group>(g_->job, std::move(world));
      } catch (const std::exception& e) {
        give_up(detail::concat("split on rank ", rank_, ": ", e.what()));  // leaves the read phase first
      }
    }
    sync(Op::kSplit, true);
    std::shared_ptr<Group> group;
    if (!members.empty()) group = g_->slots[members[0]].new_group;
    sync(Op::kSplit, false);
    if (leader) {
      std::lock_guard lk(g_->job->mu);
      g_->slots[rank_].new_group.reset();
    }
    if (!group) return nullptr;
    const int new_rank = static_cast<int>(std::find(members.begin(), members.end(), rank_) - members.begin());
    return std::make_unique<LocalCommunicator>(std::move(group), new_rank, timeout_);
  }

 private:
  size_t chunk_begin(size_t count, int r) const {
    return static_cast<size_t>(static_cast<unsigned __int128>(count) * static_cast<unsigned>(r) /
                               static_cast<unsigned>(size()));
  }

  // Publishes this rank's arguments, waits for all members, then checks the arguments of all.
  void enter(const Slot& s) {
    {
      std::lock_guard lk(g_->job->mu);
      const Job& job = *g_->job;
      if (job.failed && job.failed_rank == g_->world_ranks[rank_]) {
        CPI_FAIL(op_name(s.op), " on rank ", rank_,
                 ": the communicator is broken by an earlier failure: ", job.failure);
      }
      if (job.failed) {
        CPI_FAIL(op_name(s.op), " on rank ", rank_, ": peer rank ", job.failed_rank, " failed: ", job.failure,
                 " (the communicator is broken)");
      }
      g_->slots[rank_] = s;
    }
    sync(s.op, true);
    std::string err = validate(s.op);
    if (!err.empty()) give_up(err);
  }

  // Enters the next barrier. read_after: this rank reads peers' buffers after passing it.
  void sync(Op op, bool read_after) {
    Job& job = *g_->job;
    std::unique_lock lk(job.mu);
    g_->reading[rank_] = 0;
    const uint64_t target = ++phase_;
    g_->arrived[rank_] = target;
    job.cv.notify_all();
    const int n = size();
    auto all_here = [&] {
      for (int j = 0; j < n; ++j)
        if (g_->arrived[j] < target) return false;
      return true;
    };
    auto missing_exited = [&] {
      for (int j = 0; j < n; ++j)
        if (g_->arrived[j] < target && job.exited[g_->world_ranks[j]]) return j;
      return -1;
    };
    const auto deadline = Clock::now() + timeout_;
    job.cv.wait_until(lk, deadline, [&] { return all_here() || job.failed || missing_exited() >= 0; });
    // Once everyone arrived, the last barrier completes even if the job failed meanwhile (nothing
    // more is read); a read phase never starts in a failed job.
    if (all_here() && !(job.failed && read_after)) {
      if (read_after) g_->reading[rank_] = 1;
      return;
    }
    std::string msg;
    if (job.failed) {
      msg = detail::concat(op_name(op), " on rank ", rank_, ": peer rank ", job.failed_rank, " failed: ", job.failure);
    } else if (int j = missing_exited(); j >= 0) {
      msg = detail::concat(op_name(op), " on rank ", rank_, ": rank ", j,
                           " returned from its function without entering ", op_name(op));
    } else {
      std::string missing;
      for (int j = 0; j < n; ++j)
        if (g_->arrived[j] < target) missing += (missing.empty() ? "" : ", ") + std::to_string(j);
      msg = detail::concat(op_name(op), " timed out after ", timeout_.count(), " ms on rank ", rank_, " of ", n,
                           ": rank(s) [", missing,
                           "] did not arrive (hung, slower than the timeout, or calling a different collective)");
    }
    give_up_locked(lk, msg);
  }

  [[noreturn]] void give_up(const std::string& msg) {
    std::unique_lock lk(g_->job->mu);
    give_up_locked(lk, msg);
  }

  // Marks the job failed, waits until no member reads this rank's buffers, then throws.
  [[noreturn]] void give_up_locked(std::unique_lock<std::mutex>& lk, const std::string& msg) {
    Job& job = *g_->job;
    g_->reading[rank_] = 0;
    if (!job.failed) {
      job.failed = true;
      job.failed_rank = g_->world_ranks[rank_];
      job.failure = msg;
    }
    job.cv.notify_all();
    job.cv.wait(lk, [&] { return std::none_of(g_->reading.begin(), g_->reading.end(), [](char r) { return r; }); });
    lk.unlock();
    throw Error(msg);
  }

  // Checks the published arguments of all members. Pure function of the slots, so every member
  // returns the same message.
  std::string validate(Op op) const {
    const int n = size();
    const auto& sl = g_->slots;
    const char* name = op_name(op);
    for (int j = 0; j < n; ++j) {
      if (sl[j].op != sl[0].op) {
        return detail::concat("collective mismatch: rank ", 0, " called ", op_name(sl[0].op), " but rank ", j,
                              " called ", op_name(sl[j].op),
                              " (every rank must call the same collectives in the "
                              "same order)");
      }
    }
    auto check_counts = [&](std::span<const size_t> c, int j, const char* what) -> std::string {
      if (c.size() != static_cast<size_t>(n))
        return detail::concat(name, ": rank ", j, " passed ", what, " with ", c.size(), " entries, expected ", n,
                              " (one per rank)");
      if (sum_overflows(c)) return detail::concat(name, ": rank ", j, " passed ", what, " whose sum overflows size_t");
      return {};
    };
    auto null_check = [&](const void* p, size_t bytes, int j, const char* what) -> std::string {
      if (p == nullptr && bytes > 0)
        return detail::concat(name, ": rank ", j, " passed a null ", what, " buffer for ", bytes, " bytes");
      return {};
    };
    std::string e;
    switch (op) {
      case Op::kAllGatherv:
        for (int j = 0; j < n && e.empty(); ++j) e = check_counts(sl[j].counts, j, "recv_bytes");
        for (int j = 0; j < n && e.empty(); ++j) {
          for (int q = 0; q < n && e.empty(); ++q)
            if (sl[j].counts[q] != sl[q].n)
              e = detail::concat(name, ": rank ", j, " expects ", sl[j].counts[q], " bytes from rank ", q,
                                 " (recv_bytes[", q, "]) but rank ", q, " sends ", sl[q].n);
          size_t total = 0, off = 0;
          for (int q = 0; q < n; ++q) {
            if (q < j) off += sl[j].counts[q];
            total += sl[j].counts[q];
          }
          if (e.empty()) e = null_check(sl[j].send, sl[j].n, j, "send");
          if (e.empty()) e = null_check(sl[j].recv, total, j, "recv");
          const char* slot = static_cast<const char*>(sl[j].recv) + (sl[j].recv ? off : 0);
          if (e.empty() && sl[j].send != slot && overlaps(sl[j].send, sl[j].n, sl[j].recv, total))
            e = detail::concat(name, ": rank ", j, ": send overlaps recv without being its own slot of recv");
        }
        break;
      case Op::kAllReduceSum:
        for (int j = 0; j < n && e.empty(); ++j) {
          if (sl[j].dtype != DType::F32)
            e = detail::concat(name, ": rank ", j, " passed dtype ", dtype_name(sl[j].dtype),
                               "; the local back-end reduces F32 only");
          else if (sl[j].n != sl[0].n)
            e = detail::concat(name, ": rank ", j, " passed count ", sl[j].n, " but rank 0 passed ", sl[0].n);
          else if (sl[j].n > SIZE_MAX / sizeof(float))
            e = detail::concat(name, ": count ", sl[j].n, " too large");
          else
            e = null_check(sl[j].recv, sl[j].n * sizeof(float), j, "");
        }
        break;
      case Op::kReduceScatterv:
        for (int j = 0; j < n && e.empty(); ++j) {
          e = check_counts(sl[j].counts, j, "counts");
          if (!e.empty()) break;
          if (sl[j].dtype != DType::F32) {
            e = detail::concat(name, ": rank ", j, " passed dtype ", dtype_name(sl[j].dtype),
                               "; the local back-end reduces F32 only");
            break;
          }
          if (!std::equal(sl[j].counts.begin(), sl[j].counts.end(), sl[0].counts.begin())) {
            e = detail::concat(name, ": rank ", j,
                               " passed counts different from rank 0's (counts must be "
                               "identical on every rank)");
            break;
          }
          size_t total = 0;
          for (size_t c : sl[j].counts) total += c;
          if (total > SIZE_MAX / sizeof(float)) e = detail::concat(name, ": total count ", total, " too large");
          if (e.empty()) e = null_check(sl[j].send, total * sizeof(float), j, "send");
          if (e.empty()) e = null_check(sl[j].recv, sl[j].counts[j] * sizeof(float), j, "recv");
          if (e.empty() && overlaps(sl[j].send, total * sizeof(float), sl[j].recv, sl[j].counts[j] * sizeof(float)))
            e = detail::concat(name, ": rank ", j, ": recv overlaps send");
        }
        break;
      case Op::kAllToAllv:
        for (int j = 0; j < n && e.empty(); ++j) {
          e = check_counts(sl[j].counts, j, "recv_bytes");
          if (e.empty()) e = check_counts(sl[j].counts2, j, "send_bytes");
        }
        for (int j = 0; j < n && e.empty(); ++j) {
          for (int q = 0; q < n && e.empty(); ++q)
            if (sl[j].counts[q] != sl[q].counts2[j])
              e = detail::concat(name, ": rank ", j, " expects ", sl[j].counts[q], " bytes from rank ", q,
                                 " (recv_bytes[", q, "]) but rank ", q, " sends it ", sl[q].counts2[j], " (send_bytes[",
                                 j, "])");
          size_t st = 0, rt = 0;
          for (int q = 0; q < n; ++q) st += sl[j].counts2[q], rt += sl[j].counts[q];
          if (e.empty()) e = null_check(sl[j].send, st, j, "send");
          if (e.empty()) e = null_check(sl[j].recv, rt, j, "recv");
          if (e.empty() && overlaps(sl[j].send, st, sl[j].recv, rt))
            e = detail::concat(name, ": rank ", j, ": recv overlaps send");
        }
        break;
      case Op::kBroadcast:
        for (int j = 0; j < n && e.empty(); ++j) {
          if (sl[j].root != sl[0].root)
            e = detail::concat(name, ": rank ", j, " passed root ", sl[j].root, " but rank 0 passed ", sl[0].root);
          else if (sl[j].root < 0 || sl[j].root >= n)
            e = detail::concat(name, ": root ", sl[j].root, " out of range for ", n, " ranks");
          else if (sl[j].n != sl[0].n)
            e = detail::concat(name, ": rank ", j, " passed ", sl[j].n, " bytes but rank 0 passed ", sl[0].n);
          else
            e = null_check(sl[j].recv, sl[j].n, j, "");
        }
        break;
      case Op::kBarrier:
      case Op::kSplit:
        break;
    }
    return e;
  }

  std::shared_ptr<Group> g_;
  int rank_;
  uint64_t phase_ = 0;          // barriers this rank entered in g_
  std::vector<float> scratch_;  // reduction results, read by peers during all_reduce_sum
};

}  // namespace

void run_local(int n, std::chrono::milliseconds timeout, const std::function<void(Communicator&)>& fn) {
  CPI_CHECK(n >= 1 && n <= 4096, "run_local: number of ranks ", n, " must be in [1, 4096]");
  CPI_CHECK(timeout.count() > 0, "run_local: timeout must be positive, got ", timeout.count(), " ms");
  auto job = std::make_shared<Job>(n);
  std::vector<int> world(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) world[r] = r;
  auto group = std::make_shared<Group>(job, std::move(world));
  std::vector<std::unique_ptr<LocalCommunicator>> comms;
  for (int r = 0; r < n; ++r) comms.push_back(std::make_unique<LocalCommunicator>(group, r, timeout));

  std::vector<std::string> errors(static_cast<size_t>(n));
  int first_thrower = -1;
  // Marks rank r failed (if it is the first) and finished; wakes ranks waiting for it.
  auto finish = [&](int r, std::string err) {
    std::lock_guard lk(job->mu);
    if (!err.empty()) {
      errors[r] = std::move(err);
      if (first_thrower < 0) first_thrower = r;
      if (!job->failed) {
        job->failed = true;
        job->failed_rank = r;
        job->failure = errors[r];
      }
    }
    job->exited[r] = 1;
    job->cv.notify_all();
  };
  auto body = [&](int r) {
    std::string err;
    try {
      fn(*comms[r]);
    } catch (const std::exception& e) {
      err = e.what();
      if (err.empty()) err = "exception without a message";
    } catch (...) {
      err = "unknown exception";
    }
    finish(r, std::move(err));
  };

  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int r = 1; r < n; ++r) {
    try {
      threads.emplace_back(body, r);
    } catch (const std::exception& e) {
      for (int q = r; q < n; ++q) finish(q, detail::concat("could not start the thread of rank ", q, ": ", e.what()));
      break;
    }
  }
  body(0);  // rank 0 runs on the calling thread
  for (auto& t : threads) t.join();

  if (first_thrower < 0) return;
  // The first failure in time is the cause; the others are its echoes ("peer rank R failed").
  // A rank that gave up in a collective (timeout, bad arguments) is the cause when it rethrew.
  const int r = job->failed_rank >= 0 && !errors[job->failed_rank].empty() ? job->failed_rank : first_thrower;
  throw Error(detail::concat("rank ", r, ": ", errors[r]));
}

std::unique_ptr<Communicator> make_self_communicator() {
  auto group = std::make_shared<Group>(std::make_shared<Job>(1), std::vector<int>{0});
  return std::make_unique<LocalCommunicator>(std::move(group), 0, std::chrono::minutes(5));
}

}  // namespace cpinfer
