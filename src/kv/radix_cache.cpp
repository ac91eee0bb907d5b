#include "kv/radix_cache.h"

#include <queue>
#include <tuple>

#include "core/check.h"

namespace cpinfer {

struct RadixCache::Node {
  std::vector<int32_t> key;  // the page's tokens (page_size of them; empty at the root)
  int32_t block = -1;
  Node* parent = nullptr;
  std::map<std::vector<int32_t>, std::unique_ptr<Node>> children;
  int lock = 0;            // pins of this node or of a node below it
  uint64_t last_used = 0;  // LRU clock
  uint64_t id = 0;         // creation order: ties in LRU order are broken by age
};

RadixCache::RadixCache(int page_size) : page_size_(page_size), root_(std::make_unique<Node>()) {
  CPI_CHECK(page_size > 0, "prefix cache page size must be > 0, got ", page_size);
}

RadixCache::~RadixCache() = default;

void RadixCache::touch(Node* node) {
  ++clock_;
  for (; node; node = node->parent) node->last_used = clock_;
}

RadixCache::Match RadixCache::match(std::span<const int32_t> tokens) {
  Match m;
  Node* node = root_.get();
  std::vector<int32_t> page(page_size_);
  for (size_t off = 0; off + page_size_ <= tokens.size(); off += page_size_) {
    page.assign(tokens.begin() + off, tokens.begin() + off + page_size_);
    auto it = node->children.find(page);
    if (it == node->children.end()) break;
    node = it->second.get();
    m.blocks.push_back(node->block);
  }
  if (node != root_.get()) {
    m.last = node;
    touch(node);
  }
  return m;
}

void RadixCache::pin(Node* node) {
  for (; node && node != root_.get(); node = node->parent)
    if (node->lock++ == 0) ++n_pinned_;
}

void RadixCache::unpin(Node* node) {
  for (; node && node != root_.get(); node = node->parent) {
    CPI_CHECK(node->lock > 0, "prefix cache: unpin of a node that is not pinned");
    if (--node->lock == 0) --n_pinned_;
  }
}

std::vector<int32_t> RadixCache::insert(std::span<const int32_t> tokens, std::span<const int32_t> blocks) {
  const size_t n_pages = tokens.size() / page_size_;
  CPI_CHECK(blocks.size() >= n_pages, "prefix cache insert: ", n_pages, " pages but ", blocks.size(), " blocks");
  std::vector<int32_t> taken;
  Node* node = root_.get();
  for (size_t p = 0; p < n_pages; ++p) {
    std::vector<int32_t> page(tokens.begin() + p * page_size_, tokens.begin() + (p + 1) * page_size_);
    auto it = node->children.find(page);
    if (it == node->children.end()) {
      auto child = std::make_unique<Node>();
      child->key = page;
      child->block = blocks[p];
      child->parent = node;
      child->id = ++clock_;
      // A new node under a pinned path is not pinned itself: pins count per node.
      Node* raw = child.get();
      node->children.emplace(std::move(page), std::move(child));
      taken.push_back(blocks[p]);
      ++n_nodes_;
      node = raw;
    } else {
      node = it->second.get();
    }
  }
  if (node != root_.get()) touch(node);
  return taken;
}

std::vector<int32_t> RadixCache::evict(int n_blocks) {
  std::vector<int32_t> freed;
  if (n_blocks <= 0) return freed;
  using Entry = std::tuple<uint64_t, uint64_t, Node*>;  // (last_used, id, node): oldest first
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> leaves;
  std::vector<Node*> stack = {root_.get()};
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (auto& [k, c] : n->children) stack.push_back(c.get());
    if (n != root_.get() && n->children.empty() && n->lock == 0) leaves.emplace(n->last_used, n->id, n);
  }
  while (!leaves.empty() && static_cast<int>(freed.size()) < n_blocks) {
    Node* n = std::get<2>(leaves.top());
    leaves.pop();
    Node* parent = n->parent;
    freed.push_back(n->block);
    --n_nodes_;
    const std::vector<int32_t> key = n->key;  // erase destroys n (and its key)
    parent->children.erase(key);
    if (parent != root_.get() && parent->children.empty() && parent->lock == 0)
      leaves.emplace(parent->last_used, parent->id, parent);
  }
  return freed;
}

}  // namespace cpinfer
