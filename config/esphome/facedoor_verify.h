// facedoor_verify.h: check a signed facedoor relay command on an ESPHome node (ESP32: mbedtls).
//
// Copy this file next to the node's YAML and add `includes: [facedoor_verify.h]` under `esphome:`
// (see config/unlock-esphome.yaml). The door, with mqtt.signing_key_file set and the unlock
// payload '{"state": "UNLOCK"}', sends {"state":"UNLOCK","expires_at_ms":N,"id":"<uuid4>","sig":"<hex>"}:
// sig = lowercase hex HMAC-SHA256(key, canonical JSON without "sig"), as for every signed door
// message (daemon/facedoor/signing.py). The key is the text of the key file, stripped, used as-is.
//
// check_unlock() answers nullptr when the command may open the door, else why not, checking in
// this order: exactly the four fields; state UNLOCK; id a UUID; expires_at_ms an integer; the
// HMAC (constant-time compare); a valid clock; not past expires_at_ms; expires_at_ms at most
// 5 minutes ahead (a door clock that runs fast must not extend every command); id not accepted
// before (the last SEEN_SLOTS ids are kept until they expire; all slots live = refuse: fail closed).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "mbedtls/md.h"

namespace facedoor {

constexpr double MAX_AHEAD_MS = 300000.0;
constexpr double MAX_SAFE_INT = 9007199254740992.0;  // 2^53: the door never signs larger integers
constexpr int SEEN_SLOTS = 16;                      // unlocks are seconds apart: 16 live ids is plenty

struct SeenId {
  char id[37];
  double expires_ms;
};
static SeenId seen_ids[SEEN_SLOTS];

inline bool is_uuid(const std::string &s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); i++) {
    const char c = s[i];
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? c != '-' : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

inline std::string hmac_sha256_hex(const std::string &key, const std::string &message) {
  unsigned char mac[32];
  const mbedtls_md_info_t *sha256 = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
  if (sha256 == nullptr ||
      mbedtls_md_hmac(sha256, reinterpret_cast<const unsigned char *>(key.data()), key.size(),
                      reinterpret_cast<const unsigned char *>(message.data()), message.size(), mac) != 0)
    return "";
  static const char digits[] = "0123456789abcdef";
  std::string hex(64, '0');
  for (int i = 0; i < 32; i++) {
    hex[2 * i] = digits[mac[i] >> 4];
    hex[2 * i + 1] = digits[mac[i] & 0x0f];
  }
  return hex;
}

inline bool equal_constant_time(const std::string &a, const std::string &b) {
  if (a.size() != b.size() || a.empty()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); i++) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// FIELDS: how many members the JSON object has; NOW_MS: the node's clock in epoch ms, 0 if not valid.
inline const char *check_unlock(const std::string &key, const std::string &state, const std::string &id,
                                double expires_ms, const std::string &sig, size_t fields, double now_ms) {
  if (fields != 4) return "unexpected fields";
  if (state != "UNLOCK") return "not an unlock";
  if (!is_uuid(id)) return "id is not a UUID";
  if (!(expires_ms >= 0 && expires_ms <= MAX_SAFE_INT && std::floor(expires_ms) == expires_ms))
    return "expires_at_ms is not an integer";
  char canonical[128];
  std::snprintf(canonical, sizeof canonical, "{\"expires_at_ms\":%.0f,\"id\":\"%s\",\"state\":\"UNLOCK\"}",
                expires_ms, id.c_str());
  if (!equal_constant_time(hmac_sha256_hex(key, canonical), sig)) return "bad signature";
  if (!(now_ms > 0)) return "no valid time";
  if (now_ms > expires_ms) return "expired";
  if (expires_ms - now_ms > MAX_AHEAD_MS) return "too far ahead";
  int free_slot = -1;
  for (int i = 0; i < SEEN_SLOTS; i++) {
    if (seen_ids[i].expires_ms >= now_ms) {
      if (std::strcmp(seen_ids[i].id, id.c_str()) == 0) return "replay";
    } else if (free_slot < 0) {
      free_slot = i;
    }
  }
  if (free_slot < 0) return "replay cache full";
  std::strncpy(seen_ids[free_slot].id, id.c_str(), sizeof seen_ids[free_slot].id - 1);
  seen_ids[free_slot].id[sizeof seen_ids[free_slot].id - 1] = '\0';
  seen_ids[free_slot].expires_ms = expires_ms;
  return nullptr;
}

}  // namespace facedoor
