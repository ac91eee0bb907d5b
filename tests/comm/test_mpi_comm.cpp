// The MPI communicator under mpirun (-np 2 and -np 4): the same collective checks as the local
// back-end, once directly and once with a tiny message cap that forces the chunked paths calls
// above 2 GiB take. Own main(): MPI is initialized through make_mpi_communicator, only rank 0
// prints the gtest report, other ranks print their failures, and the exit code is agreed.
#include <gtest/gtest.h>

#include <cstdio>

#include "collective_checks.h"
#include "comm/communicator.h"
#include "comm/mpi_comm.h"
#include "core/check.h"

namespace cpinfer {
namespace {

using namespace std::chrono_literals;
Communicator* g_world = nullptr;

TEST(MpiComm, Basics) {
  EXPECT_TRUE(launched_by_mpirun());
  EXPECT_EQ(g_world->kind(), "mpi");
  EXPECT_GE(g_world->size(), 1);
  const char* env = std::getenv("OMPI_COMM_WORLD_SIZE");
  if (env) EXPECT_EQ(g_world->size(), std::atoi(env));
  // Ranks are distinct: the gathered ranks are 0..n-1 in order.
  std::vector<int> ranks(g_world->size(), -1);
  std::vector<size_t> rb(g_world->size(), sizeof(int));
  const int me = g_world->rank();
  g_world->all_gatherv(&me, sizeof me, ranks.data(), rb);
  for (int r = 0; r < g_world->size(); ++r) EXPECT_EQ(ranks[r], r);
}

TEST(MpiComm, AllCollectivesExact) { comm_test::check_all(*g_world); }

TEST(MpiComm, ChunkedPathsExact) {
  auto c = g_world->split(0, g_world->rank());
  ASSERT_NE(c, nullptr);
  mpi_set_max_message_bytes(*c, 16);
  comm_test::check_all(*c);
  // A message much larger than the cap, with an odd size.
  std::vector<float> v(4099);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 97) + static_cast<float>(c->rank());
  c->all_reduce_sum(v.data(), v.size(), DType::F32);
  const int n = c->size();
  size_t bad = 0;
  for (size_t i = 0; i < v.size(); ++i)
    bad += v[i] != static_cast<float>(n) * static_cast<float>(i % 97) + static_cast<float>(n * (n - 1) / 2);
  EXPECT_EQ(bad, 0u);
}

// Arguments every rank gets wrong the same way fail before any message is sent, so the
// communicator stays usable.
TEST(MpiComm, BadArgumentsAreClearErrors) {
  const int n = g_world->size();
  char buf[64] = {};
  std::vector<size_t> short_counts(static_cast<size_t>(n) + 1, 1);
  try {
    g_world->all_gatherv(buf, 1, buf + 32, short_counts);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("recv_bytes has " + std::to_string(n + 1) + " entries"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(g_world->all_reduce_sum(buf, 4, DType::BF16), Error);
  EXPECT_THROW(g_world->broadcast(buf, 4, n), Error);
  g_world->barrier();
}

TEST(MpiComm, SetCapRejectsOtherCommunicators) {
  auto self = make_self_communicator();
  EXPECT_THROW(mpi_set_max_message_bytes(*self, 1024), Error);
  EXPECT_THROW(mpi_set_max_message_bytes(*g_world, 2), Error);
}

// Prints failed assertions of ranks other than 0, which have no gtest printer.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?", r.line_number(),
                   r.summary());
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace cpinfer

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<cpinfer::Communicator> world;
  try {
    world = cpinfer::make_mpi_communicator(std::chrono::seconds(20));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  cpinfer::g_world = world.get();
  if (world->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new cpinfer::FailurePrinter(world->rank()));
  }
  int rc = RUN_ALL_TESTS();
  try {
    float failed = rc != 0 ? 1.0f : 0.0f;
    world->all_reduce_sum(&failed, 1, cpinfer::DType::F32);
    rc = failed != 0.0f ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    rc = 1;
  }
  world.reset();
  return rc;
}
