// Collective checks shared by the local (threads) and the MPI tests: each runs on every rank of a
// communicator of any size, with uneven per-rank sizes (zero-byte contributions included), and
// checks exact results plus a sentinel past the end of every output buffer.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "comm/communicator.h"

namespace cpinfer::comm_test {

constexpr uint8_t kSentinel = 0xEE;
constexpr size_t kGuard = 16;  // sentinel bytes after each output

inline uint8_t pattern(int a, int b, size_t i) { return static_cast<uint8_t>(a * 37 + b * 11 + i * 7 + 1); }
// Rank r's all_gatherv contribution: every third rank sends nothing.
inline size_t gather_bytes(int r) { return r % 3 == 1 ? 0 : 5 + 13 * static_cast<size_t>(r); }
// Bytes rank i sends to rank j in all_to_allv.
inline size_t a2a_bytes(int i, int j) {
  return (i + 2 * j) % 4 == 0 ? 0 : static_cast<size_t>((i * 3 + j * 5) % 17 + 1);
}
// Segment size of rank r in reduce_scatterv.
inline size_t rs_count(int r) { return r % 3 == 1 ? 0 : 2 + 3 * static_cast<size_t>(r); }

inline void expect_guard(const std::vector<uint8_t>& v, size_t from, const char* what) {
  for (size_t i = from; i < v.size(); ++i) {
    if (v[i] != kSentinel) {
      ADD_FAILURE() << what << ": wrote past the end at byte " << i;
      return;
    }
  }
}

inline void check_all_gatherv(Communicator& c) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> rb(n);
  for (int r = 0; r < n; ++r) rb[r] = gather_bytes(r);
  const size_t total = std::accumulate(rb.begin(), rb.end(), size_t{0});
  std::vector<uint8_t> send(rb[me]);
  for (size_t i = 0; i < send.size(); ++i) send[i] = pattern(me, 0, i);
  std::vector<uint8_t> recv(total + kGuard, kSentinel);
  c.all_gatherv(send.data(), send.size(), recv.data(), rb);
  size_t off = 0, bad = 0;
  for (int r = 0; r < n; ++r) {
    for (size_t i = 0; i < rb[r]; ++i) bad += recv[off + i] != pattern(r, 0, i);
    off += rb[r];
  }
  EXPECT_EQ(bad, 0u) << "all_gatherv n=" << n << " rank " << me;
  expect_guard(recv, total, "all_gatherv");

  // In place: this rank's contribution already sits in its slot of recv.
  std::vector<uint8_t> buf(total + kGuard, kSentinel);
  size_t my_off = 0;
  for (int r = 0; r < me; ++r) my_off += rb[r];
  if (!send.empty()) std::memcpy(buf.data() + my_off, send.data(), send.size());
  c.all_gatherv(buf.data() + my_off, send.size(), buf.data(), rb);
  EXPECT_TRUE(std::equal(recv.begin(), recv.end(), buf.begin())) << "in-place all_gatherv n=" << n;

  // Nobody sends anything.
  std::vector<size_t> zeros(n, 0);
  c.all_gatherv(nullptr, 0, nullptr, zeros);
}

inline void check_all_reduce_sum(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (size_t count : {size_t{0}, size_t{1}, size_t{3}, size_t{1003}}) {
    // Dyadic values: every partial sum is exact, so any summation order gives the same bits.
    std::vector<float> buf(count + kGuard / 4, -7.0f);
    for (size_t i = 0; i < count; ++i) buf[i] = static_cast<float>(me + 1) * 0.5f + static_cast<float>(i % 64) * 0.25f;
    c.all_reduce_sum(buf.data(), count, DType::F32);
    size_t bad = 0;
    for (size_t i = 0; i < count; ++i) {
      const float want =
          0.5f * static_cast<float>(n * (n + 1) / 2) + static_cast<float>(n) * static_cast<float>(i % 64) * 0.25f;
      bad += buf[i] != want;
    }
    EXPECT_EQ(bad, 0u) << "all_reduce_sum count=" << count << " n=" << n << " rank " << me;
    for (size_t i = count; i < buf.size(); ++i) EXPECT_EQ(buf[i], -7.0f) << "all_reduce_sum wrote past the end";
  }
}

// Results must be bit-identical on every rank even when rounding makes the order matter.
inline void check_all_reduce_identical(Communicator& c) {
  const int n = c.size(), me = c.rank();
  const size_t count = 517;
  std::vector<float> buf(count);
  uint32_t s = 12345u + 977u * static_cast<uint32_t>(me);
  for (auto& x : buf) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(s >> 8) / 16777216.0f * 3.0f - 1.0f;
  }
  c.all_reduce_sum(buf.data(), count, DType::F32);
  std::vector<float> all(count * n);
  std::vector<size_t> rb(n, count * sizeof(float));
  c.all_gatherv(buf.data(), count * sizeof(float), all.data(), rb);
  for (int r = 0; r < n; ++r)
    EXPECT_EQ(std::memcmp(all.data() + r * count, buf.data(), count * sizeof(float)), 0)
        << "rank " << r << " got a different all_reduce_sum result than rank " << me;
}

inline void check_reduce_scatterv(Communicator& c) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> counts(n);
  for (int r = 0; r < n; ++r) counts[r] = rs_count(r);
  const size_t total = std::accumulate(counts.begin(), counts.end(), size_t{0});
  std::vector<float> send(total);
  for (size_t e = 0; e < total; ++e) send[e] = static_cast<float>(me) + static_cast<float>(e % 50) * 0.5f;
  std::vector<float> recv(counts[me] + 4, -7.0f);
  c.reduce_scatterv_sum(send.data(), recv.data(), counts, DType::F32);
  size_t begin = 0;
  for (int r = 0; r < me; ++r) begin += counts[r];
  size_t bad = 0;
  for (size_t i = 0; i < counts[me]; ++i) {
    const size_t e = begin + i;
    const float want = static_cast<float>(n * (n - 1) / 2) + static_cast<float>(n) * static_cast<float>(e % 50) * 0.5f;
    bad += recv[i] != want;
  }
  EXPECT_EQ(bad, 0u) << "reduce_scatterv_sum n=" << n << " rank " << me;
  for (size_t i = counts[me]; i < recv.size(); ++i) EXPECT_EQ(recv[i], -7.0f) << "reduce_scatterv wrote past the end";
}

inline void check_all_to_allv(Communicator& c) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> sb(n), rb(n);
  for (int j = 0; j < n; ++j) {
    sb[j] = a2a_bytes(me, j);
    rb[j] = a2a_bytes(j, me);
  }
  const size_t st = std::accumulate(sb.begin(), sb.end(), size_t{0});
  const size_t rt = std::accumulate(rb.begin(), rb.end(), size_t{0});
  std::vector<uint8_t> send(st);
  size_t off = 0;
  for (int j = 0; j < n; ++j)
    for (size_t k = 0; k < sb[j]; ++k) send[off++] = pattern(me, j, k);
  std::vector<uint8_t> recv(rt + kGuard, kSentinel);
  c.all_to_allv(send.data(), sb, recv.data(), rb);
  off = 0;
  size_t bad = 0;
  for (int j = 0; j < n; ++j)
    for (size_t k = 0; k < rb[j]; ++k) bad += recv[off++] != pattern(j, me, k);
  EXPECT_EQ(bad, 0u) << "all_to_allv n=" << n << " rank " << me;
  expect_guard(recv, rt, "all_to_allv");
}

inline void check_broadcast(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (int root = 0; root < n; ++root) {
    const size_t bytes = 37 + 3 * static_cast<size_t>(root);
    std::vector<uint8_t> buf(bytes + kGuard, kSentinel);
    for (size_t i = 0; i < bytes; ++i) buf[i] = me == root ? pattern(root, 1, i) : 0;
    c.broadcast(buf.data(), bytes, root);
    size_t bad = 0;
    for (size_t i = 0; i < bytes; ++i) bad += buf[i] != pattern(root, 1, i);
    EXPECT_EQ(bad, 0u) << "broadcast root=" << root << " n=" << n << " rank " << me;
    expect_guard(buf, bytes, "broadcast");
  }
  c.broadcast(nullptr, 0, n - 1);
}

// color = rank % 2, key = -rank: each half in reverse rank order; then rank 0 opts out.
inline void check_split(Communicator& c) {
  const int n = c.size(), me = c.rank();
  auto sub = c.split(me % 2, -me);
  ASSERT_NE(sub, nullptr);
  std::vector<int> members;  // old ranks of my color, by key
  for (int r = n - 1; r >= 0; --r)
    if (r % 2 == me % 2) members.push_back(r);
  EXPECT_EQ(sub->size(), static_cast<int>(members.size()));
  EXPECT_EQ(sub->rank(), static_cast<int>(std::find(members.begin(), members.end(), me) - members.begin()));
  EXPECT_EQ(sub->kind(), c.kind());
  EXPECT_EQ(sub->timeout(), c.timeout());
  std::vector<int> got(sub->size(), -1);
  std::vector<size_t> rb(sub->size(), sizeof(int));
  sub->all_gatherv(&me, sizeof(int), got.data(), rb);
  EXPECT_EQ(got, members) << "split order on rank " << me;
  float one = 1.0f;
  sub->all_reduce_sum(&one, 1, DType::F32);
  EXPECT_EQ(one, static_cast<float>(sub->size()));

  // Negative color: no communicator. Split of a split.
  auto rest = c.split(me == 0 ? -1 : 5, 0);
  if (me == 0) {
    EXPECT_EQ(rest, nullptr);
  } else {
    ASSERT_NE(rest, nullptr);
    EXPECT_EQ(rest->size(), n - 1);
    EXPECT_EQ(rest->rank(), me - 1);
    auto pairs = rest->split(rest->rank() / 2, 0);
    ASSERT_NE(pairs, nullptr);
    EXPECT_EQ(pairs->rank(), rest->rank() % 2);
    int v = me, sum = 0;
    std::vector<int> all(pairs->size());
    std::vector<size_t> prb(pairs->size(), sizeof(int));
    pairs->all_gatherv(&v, sizeof(int), all.data(), prb);
    for (int x : all) sum += x;
    const int first = 1 + (rest->rank() / 2) * 2;  // old rank of the pair's first member
    EXPECT_EQ(sum, pairs->size() == 2 ? 2 * first + 1 : first);
  }
  c.barrier();
}

inline void check_all(Communicator& c) {
  check_all_gatherv(c);
  check_all_reduce_sum(c);
  check_all_reduce_identical(c);
  check_reduce_scatterv(c);
  check_all_to_allv(c);
  check_broadcast(c);
  c.barrier();
  check_split(c);
}

}  // namespace cpinfer::comm_test
