package polycommit.foreign;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.File;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * A polycommit producer written the way any Java team would write one: the schema file shipped with
 * polycommit parsed by a stock {@code Schema.Parser}, records built with {@code GenericRecordBuilder}
 * (schema defaults fill what is not set), framed by the stock {@code BinaryMessageEncoder} and read back
 * with the stock {@code BinaryMessageDecoder}; stock Kafka clients. Nothing polycommit-specific.
 *
 * <pre>
 * send --schemas DIR --bootstrap HOST:PORT --intents TOPIC --replies TOPIC --partition P
 *      --tx-id ID --steps STEPS.json [--timeout-ms MS]
 *     publish one intent (Kafka key = tx id, UTF-8; reply_to = TOPIC:P), wait for its TransactionResult
 *     on that reply partition, print it as JSON. STEPS.json is a JSON array of operations, each an
 *     object of Operation's string fields (store, kind, target, key, values, ...), written as is.
 * decode-result --schemas DIR --file BYTES
 *     decode a single-object-encoded TransactionResult from a file, print it as JSON.
 * fingerprints FILE...
 *     parse each schema file alone and print "file TAB full name TAB CRC-64-AVRO fingerprint (hex)".
 * </pre>
 * Exit codes: 0 done, 2 usage, 3 no result before the timeout.
 */
public final class ForeignProducer {
    private ForeignProducer() {}

    public static void main(String[] args) throws Exception {
        if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
            System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        }
        if (args.length == 0) {
            usage("no command");
        }
        switch (args[0]) {
            case "send" -> System.exit(send(options(args)));
            case "decode-result" -> {
                Map<String, String> opts = options(args);
                Schema schema = schema(opts, "TransactionResult");
                byte[] data = Files.readAllBytes(new File(required(opts, "file")).toPath());
                System.out.println(decoder(schema).decode(data));
            }
            case "fingerprints" -> {
                for (int i = 1; i < args.length; i++) {
                    Schema schema = new Schema.Parser().parse(new File(args[i]));
                    byte[] fp = SchemaNormalization.parsingFingerprint("CRC-64-AVRO", schema);
                    System.out.println(new File(args[i]).getName() + "\t" + schema.getFullName() + "\t" + hex(fp));
                }
            }
            default -> usage("unknown command " + args[0]);
        }
    }

    private static int send(Map<String, String> opts) throws Exception {
        Schema intentSchema = schema(opts, "TransactionIntent");
        Schema resultSchema = schema(opts, "TransactionResult");
        String txId = required(opts, "tx-id");
        String replies = required(opts, "replies");
        int partition = Integer.parseInt(required(opts, "partition"));
        long timeoutMs = Long.parseLong(opts.getOrDefault("timeout-ms", "60000"));
        GenericRecord intent = intent(intentSchema, txId, replies + ":" + partition, required(opts, "steps"));
        ByteBuffer encoded = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), intentSchema).encode(intent);
        byte[] value = new byte[encoded.remaining()];
        encoded.get(value);

        TopicPartition replyPartition = new TopicPartition(replies, partition);
        try (KafkaConsumer<String, byte[]> consumer = consumer(required(opts, "bootstrap"));
                KafkaProducer<String, byte[]> producer = producer(required(opts, "bootstrap"))) {
            // Take the reply partition's end before publishing, so the result cannot be missed.
            consumer.assign(List.of(replyPartition));
            consumer.seekToEnd(List.of(replyPartition));
            consumer.position(replyPartition);
            producer.send(new ProducerRecord<>(required(opts, "intents"), txId, value)).get();
            BinaryMessageDecoder<GenericRecord> decoder = decoder(resultSchema);
            long deadline = System.currentTimeMillis() + timeoutMs;
            while (System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, byte[]> record : consumer.poll(Duration.ofMillis(200))) {
                    if (txId.equals(record.key())) {
                        System.out.println(decoder.decode(record.value()));
                        return 0;
                    }
                }
            }
        }
        System.err.println("no TransactionResult for " + txId + " on " + replyPartition + " within " + timeoutMs + " ms");
        return 3;
    }

    /** The intent as a foreign producer writes it: only what it means to say; the schema's defaults do the rest. */
    private static GenericRecord intent(Schema intentSchema, String txId, String replyTo, String stepsFile)
            throws Exception {
        Schema stepSchema = intentSchema.getField("steps").schema().getElementType();
        Schema operationSchema = stepSchema.getField("operation").schema();
        Schema consistency = intentSchema.getField("consistency").schema();
        JsonNode operations = new ObjectMapper().readTree(new File(stepsFile));
        List<GenericRecord> steps = new ArrayList<>();
        for (JsonNode operation : operations) {
            GenericRecordBuilder op = new GenericRecordBuilder(operationSchema);
            for (Map.Entry<String, JsonNode> field : operation.properties()) {
                op.set(field.getKey(), field.getValue().asText());
            }
            steps.add(new GenericRecordBuilder(stepSchema)
                    .set("index", steps.size()) // the step's position in the intent
                    .set("name", operation.path("store").asText() + "." + operation.path("kind").asText())
                    .set("operation", op.build())
                    .build());
        }
        return new GenericRecordBuilder(intentSchema)
                .set("tx_id", txId)
                .set("name", "java-foreign-producer")
                .set("consistency", new GenericData.EnumSymbol(consistency, "EVENTUAL"))
                .set("steps", steps)
                .set("reply_to", replyTo)
                .set("client_id", "java-foreign-producer")
                .set("created_at_ms", System.currentTimeMillis())
                .build();
    }

    private static BinaryMessageDecoder<GenericRecord> decoder(Schema schema) {
        return new BinaryMessageDecoder<>(GenericData.get(), schema);
    }

    private static Schema schema(Map<String, String> opts, String eventType) throws Exception {
        return new Schema.Parser().parse(new File(required(opts, "schemas"), "polycommit." + eventType + ".avsc"));
    }

    private static KafkaProducer<String, byte[]> producer(String bootstrap) {
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        security(props);
        return new KafkaProducer<>(props, new StringSerializer(), new ByteArraySerializer());
    }

    private static KafkaConsumer<String, byte[]> consumer(String bootstrap) {
        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        // The coordinator writes results inside Kafka transactions: read only what it committed.
        props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        security(props);
        return new KafkaConsumer<>(props, new StringDeserializer(), new ByteArrayDeserializer());
    }

    /**
     * The same security settings polycommit's own clients read (POLYCOMMIT_KAFKA_SECURITY_PROTOCOL,
     * _SASL_MECHANISM, _USERNAME, _PASSWORD, _SSL_CAFILE), from the environment, so that the password
     * never appears on a command line. Unset: PLAINTEXT, as before.
     */
    private static void security(Properties props) {
        Map<String, String> env = System.getenv();
        String protocol = env.getOrDefault("POLYCOMMIT_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT");
        props.put("security.protocol", protocol);
        if (protocol.startsWith("SASL_")) {
            String mechanism = env.getOrDefault("POLYCOMMIT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512");
            String module = mechanism.startsWith("SCRAM")
                    ? "org.apache.kafka.common.security.scram.ScramLoginModule"
                    : "org.apache.kafka.common.security.plain.PlainLoginModule";
            props.put("sasl.mechanism", mechanism);
            props.put("sasl.jaas.config", module + " required username=\"" + env.get("POLYCOMMIT_KAFKA_USERNAME")
                    + "\" password=\"" + env.get("POLYCOMMIT_KAFKA_PASSWORD") + "\";");
        }
        String cafile = env.get("POLYCOMMIT_KAFKA_SSL_CAFILE");
        if (cafile != null && !cafile.isEmpty()) {
            props.put("ssl.truststore.type", "PEM");
            props.put("ssl.truststore.location", cafile);
        }
    }

    private static Map<String, String> options(String[] args) {
        Map<String, String> opts = new HashMap<>();
        for (int i = 1; i < args.length; i += 2) {
            if (!args[i].startsWith("--") || i + 1 >= args.length) {
                usage("expected --name value, got " + args[i]);
            }
            opts.put(args[i].substring(2), args[i + 1]);
        }
        return opts;
    }

    private static String required(Map<String, String> opts, String name) {
        String value = opts.get(name);
        if (value == null) {
            usage("missing --" + name);
        }
        return value;
    }

    private static String hex(byte[] bytes) {
        StringBuilder out = new StringBuilder();
        for (byte b : bytes) {
            out.append(String.format("%02x", b & 0xff));
        }
        return out.toString();
    }

    private static void usage(String problem) {
        System.err.println("ForeignProducer: " + problem + " (see the class comment for usage)");
        System.exit(2);
    }
}
