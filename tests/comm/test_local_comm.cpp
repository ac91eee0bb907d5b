// The local (threads) communicator: every collective for many rank counts, and the failure paths:
// a rank that never arrives, a rank that returns early, a rank that throws, mismatched collectives
// and inconsistent arguments, all of which must end in a clear error, never a hang.
#include <gtest/gtest.h>

#include <atomic>
#include <latch>
#include <mutex>
#include <string>

#include "collective_checks.h"
#include "comm/communicator.h"
#include "core/check.h"

namespace cpinfer {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
constexpr auto kLong = std::chrono::milliseconds(60'000);  // generous: these tests must not time out

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// Runs fn on n ranks and returns run_local's error message ("" when it did not throw).
std::string run_and_catch(int n, std::chrono::milliseconds timeout, const std::function<void(Communicator&)>& fn) {
  try {
    run_local(n, timeout, fn);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

class LocalCollectives : public ::testing::TestWithParam<int> {};

TEST_P(LocalCollectives, AllCollectivesExact) {
  const int n = GetParam();
  std::atomic<int> ran{0};
  run_local(n, kLong, [&](Communicator& c) {
    EXPECT_EQ(c.size(), n);
    EXPECT_EQ(c.kind(), "local");
    comm_test::check_all(c);
    ran.fetch_add(1);
  });
  EXPECT_EQ(ran.load(), n);
}

INSTANTIATE_TEST_SUITE_P(Ranks, LocalCollectives, ::testing::Values(1, 2, 3, 4, 5, 6, 7, 8, 9, 16),
                         [](const auto& info) { return "n" + std::to_string(info.param); });

TEST(LocalComm, RanksAreDistinctAndOrdered) {
  std::vector<int> seen(5, 0);
  run_local(5, kLong, [&](Communicator& c) { seen[c.rank()] += 1; });
  EXPECT_EQ(seen, std::vector<int>(5, 1));
}

// Local reductions sum ranks 0..n-1 in order: the result equals that sequential sum bit for bit.
TEST(LocalComm, AllReduceSumsInRankOrder) {
  const int n = 7;
  const size_t count = 301;
  auto value = [](int r, size_t i) { return 1.0f / static_cast<float>(3 + r + i) * (r % 2 ? -1.0f : 1.0f) * 1e3f; };
  std::vector<float> want(count, 0.0f);
  for (size_t i = 0; i < count; ++i) {
    float acc = value(0, i);
    for (int r = 1; r < n; ++r) acc += value(r, i);
    want[i] = acc;
  }
  run_local(n, kLong, [&](Communicator& c) {
    std::vector<float> buf(count);
    for (size_t i = 0; i < count; ++i) buf[i] = value(c.rank(), i);
    c.all_reduce_sum(buf.data(), count, DType::F32);
    EXPECT_EQ(std::memcmp(buf.data(), want.data(), count * sizeof(float)), 0) << "rank " << c.rank();
  });
}

// No rank leaves a barrier before every rank entered it.
TEST(LocalComm, BarrierSeparatesPhases) {
  const int n = 6;
  std::atomic<int> entered{0};
  std::atomic<int> early{0};
  run_local(n, kLong, [&](Communicator& c) {
    for (int round = 1; round <= 20; ++round) {
      entered.fetch_add(1);
      c.barrier();
      if (entered.load() < round * n) early.fetch_add(1);
      c.barrier();
    }
  });
  EXPECT_EQ(early.load(), 0);
}

TEST(LocalComm, SelfCommunicator) {
  auto c = make_self_communicator();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  comm_test::check_all(*c);
}

// Outside mpirun the MPI communicator refuses with a message saying how to launch (or that MPI is
// not built in), without initializing MPI.
TEST(MpiOutsideMpirun, ClearError) {
  if (launched_by_mpirun()) GTEST_SKIP() << "running under mpirun";
  try {
    make_mpi_communicator(1000ms);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(m.find("not started by mpirun") != std::string::npos || m.find("no MPI support") != std::string::npos)
        << m;
  }
}

TEST(LocalComm, RejectsBadRankCount) {
  EXPECT_THROW(run_local(0, kLong, [](Communicator&) {}), Error);
  EXPECT_THROW(run_local(2, 0ms, [](Communicator&) {}), Error);
}

// A rank that never enters the collective (it is blocked elsewhere): the others time out within
// about the timeout and name the collective and the missing rank.
TEST(LocalComm, MissingRankTimesOut) {
  const int n = 3;
  const auto timeout = 300ms;
  std::latch others_failed(n - 1);
  std::mutex mu;
  std::vector<std::string> msgs(n);
  std::vector<double> elapsed(n, 0.0);
  const auto t0 = Clock::now();
  std::string err = run_and_catch(n, timeout, [&](Communicator& c) {
    if (c.rank() == 1) {
      others_failed.wait();  // stands in for a rank stuck in other work
      return;
    }
    float x = 1.0f;
    try {
      c.all_reduce_sum(&x, 1, DType::F32);
    } catch (const Error& e) {
      {
        std::lock_guard lk(mu);
        msgs[c.rank()] = e.what();
        elapsed[c.rank()] = ms_since(t0);
      }
      others_failed.count_down();
      throw;
    }
    others_failed.count_down();
  });
  ASSERT_FALSE(err.empty());
  EXPECT_NE(err.find("all_reduce_sum timed out after 300 ms"), std::string::npos) << err;
  EXPECT_NE(err.find("[1]"), std::string::npos) << err;
  for (int r : {0, 2}) {
    EXPECT_NE(msgs[r].find("all_reduce_sum"), std::string::npos) << msgs[r];
    EXPECT_GE(elapsed[r], 290.0);
    EXPECT_LT(elapsed[r], 600.0) << "rank " << r << " took too long to fail";
  }
}

// A rank that returns without calling the collective: the others fail at once, not at the timeout.
TEST(LocalComm, RankReturningEarlyFailsPeersPromptly) {
  const auto t0 = Clock::now();
  std::string err = run_and_catch(4, 10'000ms, [&](Communicator& c) {
    if (c.rank() == 2) return;
    c.barrier();
  });
  EXPECT_LT(ms_since(t0), 5000.0);
  EXPECT_NE(err.find("barrier"), std::string::npos) << err;
  EXPECT_NE(err.find("rank 2 returned from its function without entering barrier"), std::string::npos) << err;
}

// A rank that throws: run_local rethrows its error, and peers blocked in a collective fail promptly.
TEST(LocalComm, ThrowingRankFailsPeersPromptly) {
  const int n = 5;
  std::mutex mu;
  std::vector<std::string> msgs(n);
  const auto t0 = Clock::now();
  std::string err = run_and_catch(n, 10'000ms, [&](Communicator& c) {
    c.barrier();
    if (c.rank() == 3) CPI_FAIL("boom on purpose");
    try {
      std::vector<float> v(10, 1.0f);
      c.all_reduce_sum(v.data(), v.size(), DType::F32);
    } catch (const Error& e) {
      std::lock_guard lk(mu);
      msgs[c.rank()] = e.what();
      throw;
    }
  });
  EXPECT_LT(ms_since(t0), 5000.0);
  EXPECT_EQ(err.rfind("rank 3: boom on purpose", 0), 0u) << err;
  for (int r = 0; r < n; ++r) {
    if (r == 3) continue;
    EXPECT_NE(msgs[r].find("all_reduce_sum on rank " + std::to_string(r) + ": peer rank 3 failed: boom on purpose"),
              std::string::npos)
        << msgs[r];
  }
}

// Non-standard exceptions are reported too.
TEST(LocalComm, ThrowingNonStdException) {
  std::string err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    if (c.rank() == 1) throw 42;
    c.barrier();
  });
  EXPECT_NE(err.find("rank 1: unknown exception"), std::string::npos) << err;
}

// A failure elsewhere in the job wakes ranks waiting in a sub-communicator.
TEST(LocalComm, FailureReachesSubCommunicators) {
  const auto t0 = Clock::now();
  std::string err = run_and_catch(4, 10'000ms, [&](Communicator& c) {
    auto sub = c.split(c.rank() < 2 ? 0 : 1, 0);
    if (c.rank() == 3) throw std::runtime_error("rank three gives up");
    sub->barrier();  // rank 2 waits for rank 3 here
  });
  EXPECT_LT(ms_since(t0), 5000.0);
  EXPECT_NE(err.find("rank 3: rank three gives up"), std::string::npos) << err;
}

TEST(LocalComm, MismatchedCollectivesFailTogether) {
  std::atomic<int> failures{0};
  std::string err = run_and_catch(3, 10'000ms, [&](Communicator& c) {
    try {
      if (c.rank() == 1) {
        c.barrier();
      } else {
        int x = 0;
        c.broadcast(&x, sizeof x, 0);
      }
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("collective mismatch"), std::string::npos) << e.what();
      failures.fetch_add(1);
      throw;
    }
  });
  EXPECT_EQ(failures.load(), 3);
  EXPECT_NE(err.find("rank 1 called barrier"), std::string::npos) << err;
}

TEST(LocalComm, InconsistentArgumentsAreClearErrors) {
  // recv_bytes with the wrong number of entries.
  std::string err = run_and_catch(3, 10'000ms, [&](Communicator& c) {
    char buf[8] = {};
    std::vector<size_t> rb(c.rank() == 2 ? 2 : 3, 1);
    c.all_gatherv(buf, 1, buf + 4, rb);
  });
  EXPECT_NE(err.find("rank 2 passed recv_bytes with 2 entries, expected 3"), std::string::npos) << err;

  // recv_bytes disagreeing with what the peer sends.
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    char send[4] = {}, recv[8] = {};
    std::vector<size_t> rb{2, 2};
    c.all_gatherv(send, c.rank() == 1 ? 3 : 2, recv, rb);
  });
  EXPECT_NE(err.find("expects 2 bytes from rank 1"), std::string::npos) << err;

  // all_to_allv sizes that do not pair up.
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    char send[8] = {}, recv[8] = {};
    std::vector<size_t> sb{1, 1}, rb{1, c.rank() == 0 ? 2u : 1u};
    c.all_to_allv(send, sb, recv, rb);
  });
  EXPECT_NE(err.find("all_to_allv: rank 0 expects 2 bytes from rank 1"), std::string::npos) << err;

  // Unsupported dtype, bad root, different counts.
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    uint16_t v[4] = {};
    c.all_reduce_sum(v, 4, DType::BF16);
  });
  EXPECT_NE(err.find("reduces F32 only"), std::string::npos) << err;
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    int x = 0;
    c.broadcast(&x, sizeof x, 2);
  });
  EXPECT_NE(err.find("root 2 out of range"), std::string::npos) << err;
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    float v[4] = {};
    c.all_reduce_sum(v, c.rank() == 0 ? 4 : 3, DType::F32);
  });
  EXPECT_NE(err.find("rank 1 passed count 3 but rank 0 passed 4"), std::string::npos) << err;
  err = run_and_catch(2, 10'000ms, [&](Communicator& c) {
    float v[4] = {};
    std::vector<size_t> counts{2, 2};
    c.reduce_scatterv_sum(v, v + 1, counts, DType::F32);
  });
  EXPECT_NE(err.find("recv overlaps send"), std::string::npos) << err;
}

// After a failure the communicator refuses further collectives at once.
TEST(LocalComm, BrokenCommunicatorFailsFast) {
  std::atomic<int> fast_failures{0};
  run_and_catch(2, 200ms, [&](Communicator& c) {
    if (c.rank() == 0) {
      try {
        c.barrier();  // rank 1 never comes: times out
      } catch (const Error&) {
      }
      const auto t0 = Clock::now();
      try {
        c.barrier();
      } catch (const Error& e) {
        if (ms_since(t0) < 100.0 && std::string(e.what()).find("broken") != std::string::npos) fast_failures++;
      }
    }
  });
  EXPECT_EQ(fast_failures.load(), 1);
}

}  // namespace
}  // namespace cpinfer
