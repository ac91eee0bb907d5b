#include "kv/radix_cache.h"

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

// Iterative: a long prompt is a path thousands of pages deep, too deep for recursive destructors.
RadixCache::~RadixCache() {
  std::vector<std::unique_ptr<Node>> nodes;
  for (auto& [k, c] : root_->children) nodes.push_back(std::move(c));
  while (!nodes.empty()) {
    std::unique_ptr<Node> n = std::move(nodes.back());
    nodes.pop_back();
    for (auto& [k, c] : n->children) nodes.push_back(std::move(c));
  }
}

// Only an unpinned leaf can be evicted; the index holds exactly those, oldest first. A node's
// last_used changes only while it is out of the index (unindex, change, index).
void RadixCache::index(Node* node) {
  if (node != root_.get() && node->children.empty() && node->lock == 0)
    leaves_.emplace(node->last_used, node->id, node);
}

void RadixCache::unindex(Node* node) { leaves_.erase({node->last_used, node->id, node}); }

void RadixCache::touch(Node* node) {
  ++clock_;
  unindex(node);  // the nodes above have a child: none of them is indexed
  for (Node* n = node; n; n = n->parent) n->last_used = clock_;
  index(node);
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
  for (; node && node != root_.get(); node = node->parent) {
    unindex(node);
    if (node->lock++ == 0) ++n_pinned_;
  }
}

void RadixCache::unpin(Node* node) {
  for (; node && node != root_.get(); node = node->parent) {
    CPI_CHECK(node->lock > 0, "prefix cache: unpin of a node that is not pinned");
    if (--node->lock == 0) {
      --n_pinned_;
      index(node);
    }
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
      unindex(node);  // no longer a leaf
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
  while (!leaves_.empty() && static_cast<int>(freed.size()) < n_blocks) {
    Node* n = std::get<2>(*leaves_.begin());
    leaves_.erase(leaves_.begin());
    Node* parent = n->parent;
    freed.push_back(n->block);
    --n_nodes_;
    const std::vector<int32_t> key = n->key;  // erase destroys n (and its key)
    parent->children.erase(key);
    index(parent);  // a leaf now, perhaps
  }
  return freed;
}

}  // namespace cpinfer
